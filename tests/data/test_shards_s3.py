"""Shards in object storage: ``kdistill pack`` writes them to an S3 bucket and ``kdistill distill`` with
``data.name=shards data.root=s3://...`` trains from them, against an in-process S3 server (moto).

The server speaks plain HTTP. LitData fetches chunks with obstore, whose HTTP client refuses plain HTTP unless
``allow_http`` is in its client options, and LitData does not let a caller set them (they are a constant of its
downloader module; obstore ignores ``AWS_ALLOW_HTTP`` once client options are given). The test adds ``allow_http``
to that constant; everything else (the endpoint from ``AWS_ENDPOINT_URL``, boto3 for uploads and the index, obstore
for chunks, the local chunk cache, the DataLoader workers) is the path a real bucket takes."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

pytest.importorskip("litdata")
pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]'; it is in .[dev])")

from kdistill.cli import main
from kdistill.data.shards import open_shards, read_meta
from kdistill.data.transforms import build_transform

TRAIN, VAL, CLASSES = 48, 10, 4  # the image folder of conftest.make_shard_folder
BUCKET = "kdistill-test"


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch):
    """An empty bucket on an in-process S3 server; the AWS_* environment points boto3 and obstore at it."""
    import boto3
    import litdata.streaming.downloader as downloader
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(downloader, "_OBSTORE_CLIENT_OPTIONS", {**downloader._OBSTORE_CLIENT_OPTIONS, "allow_http": "true"})
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()


def test_pack_to_s3_then_distill_from_it(s3_server, packed_shards: tuple[Path, Path], tmp_path: Path) -> None:
    from kdistill.engine import module

    folder, _ = packed_shards
    url = f"s3://{BUCKET}/tiny/shards"
    assert main(["pack", str(folder), "--out", url, "--chunk-mb", "0.004"]) == 0
    keys = [o["Key"] for o in s3_server.list_objects_v2(Bucket=BUCKET, Prefix="tiny/shards/")["Contents"]]
    assert "tiny/shards/kdistill.json" in keys and "tiny/shards/train/index.json" in keys
    assert sum(k.startswith("tiny/shards/train/chunk-") for k in keys) > 2  # several shards to fetch
    assert {s: v["count"] for s, v in read_meta(url)["splits"].items()} == {"train": TRAIN, "val": VAL}

    # read back from the bucket: the very bytes, labels and indices of the folder's files
    cache = tmp_path / "chunks"
    train, val, classes = open_shards(url, build_transform("imagenet", 16), cache_dir=str(cache))
    assert classes == [f"class{c}" for c in range(CLASSES)]
    for split, ds in (("train", train), ("val", val)):
        files = sorted((folder / split).glob("*/*"))
        labels = {p: classes.index(p.parent.name) for p in files}
        expected = collections.Counter((p.read_bytes(), labels[p], i) for i, p in enumerate(files))
        got = collections.Counter((bytes(s["image"]), int(s["label"]), int(s["index"]))
                                  for s in (ds.raw(i) for i in range(ds.split_size)))
        assert got == expected, f"{split}: the bucket's samples differ from the folder's files"

    # a training run streams the bucket's shards through DataLoader workers: every sample once per epoch
    seen = []
    original = module.DistillModule.training_step

    def recording_step(self, batch, batch_idx):
        seen.append((self.current_epoch, batch.index.tolist()))
        return original(self, batch, batch_idx)

    module.DistillModule.training_step = recording_step
    try:
        code = main(["distill", "data.name=shards", f"data.root={url}", f"data.cache_dir={tmp_path / 'run-chunks'}",
                     "data.transform=imagenet", "data.image_size=16", "data.batch_size=8", "data.eval_batch_size=8",
                     "data.num_workers=2", "model=cifar.resnet8", "teacher.model=cifar.resnet8",
                     "teacher.allow_untrained=true", "method.name=kd", "trainer.max_epochs=2", "trainer.accelerator=cpu",
                     "trainer.progress_bar=false", f"output={tmp_path / 'run'}"])
    finally:
        module.DistillModule.training_step = original
    assert code == 0
    for epoch in (0, 1):
        assert sorted(i for e, batch in seen if e == epoch for i in batch) == list(range(TRAIN))
    assert any((tmp_path / "run-chunks").rglob("chunk-*.bin"))  # fetched into the local chunk cache
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs"] == 2
