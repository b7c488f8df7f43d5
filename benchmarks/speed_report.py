"""The speed harness's report: the Markdown table of the cached rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def row_key(pair: str, method: str) -> str:
    return f"{pair}/{method}"



def fmt(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"



def paired(r: dict[str, Any]) -> str:
    e = r.get("excess_paired")
    return f"{e['median_ms']:+.1f} [{e['ci95_ms'][0]:+.1f}, {e['ci95_ms'][1]:+.1f}]" if e else "—"



def write_report(path: Path, rows: dict[str, Any], meta: dict[str, Any]) -> None:
    lines = [
        "# Speed: training-step time per method against the floors",
        "",
        f"Machine: {meta['machine']}",
        "Commands (in order; rows are cached and resumed):",
        *[f"    {c}" for c in meta.get("commands", [meta["command"]])],
        "",
        f"Settings: batch {meta['batch']}, 32×32, 100 classes, {meta['threads']} intra-op thread(s), device {meta['device']}; "
        f"measured steps per row in column n, after {meta['warmup']} warm-up steps, interleaved; medians; "
        f"CPU allocator: {meta['allocator']} (keep = glibc keeps freed memory between steps, as the engine sets).",
        "",
        "**Load:** the 1-minute load average at the start and end of each row is listed (2 cores: a load of 2 means",
        "one single-thread job on the other core besides this one; above 2, jobs share cores and wall times inflate).",
        "The *CPU ms* columns (thread CPU time) are the ones to read under load; they still include cache and",
        "memory-bandwidth contention. The paired column takes step − floor within each interleaved iteration.",
        "",
        "| pair | method | step CPU ms | student CPU ms | teacher CPU ms | **overhead ratio** (CPU) | ratio (wall) | "
        "modules fwd+bwd ms | step − floor ms | (step − floor) / modules | paired step − floor ms [95% CI] | "
        "images/s (CPU) | peak RSS MiB | faults/step | n | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(rows):
        r = rows[key]
        if r["method"] in ("teacher", "epoch") or "error" in r:
            continue
        t = r["times"]
        s, te = t["student"]["cpu_ms"], t["teacher"]["cpu_ms"]
        floor = s + te
        if r["method"] == "kd+cache":
            step = t["cached"]["cpu_ms"]
            ratio = step / floor
            wall_ratio = t["cached"]["wall_ms"] / (t["student"]["wall_ms"] + t["teacher"]["wall_ms"])
            mods, excess, rel = "—", step - floor, "—"
            faults = t["cached"]["faults"]
        else:
            step = t["method"]["cpu_ms"]
            ratio = step / floor
            wall_ratio = t["method"]["wall_ms"] / (t["student"]["wall_ms"] + t["teacher"]["wall_ms"])
            m = t["modules"]["cpu_ms"]
            mods, excess = fmt(m), step - floor
            rel = f"{excess / m:.2f}" if m > 0 else "—"
            faults = t["method"]["faults"]
        lines.append(
            f"| {r['pair']} | {r['method']} | {fmt(step)} | {fmt(s)} | {fmt(te)} | **{ratio:.3f}** | {wall_ratio:.3f} | {mods} | "
            f"{excess:+.1f} | {rel} | {paired(r)} | {r['batch'] * 1000 / step:.0f} | {r['peak_mb']:.0f} | {faults:.0f} | {r['steps']} | "
            f"{r['load'][0][0]:.1f}→{r['load'][1][0]:.1f} |"
        )
    if any(r.get("pair") == "tiny" for r in rows.values()):
        lines += ["", "The `tiny` pair (a one-conv teacher and student, a floor of a few milliseconds) is not a workload: "
                  "it shows the framework's fixed per-step cost, which the resnet pairs cannot resolve (their "
                  "step-to-step noise is tens of milliseconds). Its overhead ratio is that fixed cost over a tiny "
                  "floor; read its step − floor against the modules' own time."]
    cache_rows = [r for r in rows.values() if r["method"] == "kd+cache" and "error" not in r]
    if cache_rows:
        lines += ["", "## Teacher-output cache: KD step with and without the cache (augmentation included)", "",
                  "| pair | KD step CPU ms (teacher pass) | KD step CPU ms (cached logits) | **epoch speed-up** (CPU) | speed-up (wall) |",
                  "|---|---|---|---|---|"]
        for r in cache_rows:
            t = r["times"]
            lines.append(f"| {r['pair']} | {fmt(t['method']['cpu_ms'])} | {fmt(t['cached']['cpu_ms'])} | "
                         f"**{t['method']['cpu_ms'] / t['cached']['cpu_ms']:.2f}×** | {t['method']['wall_ms'] / t['cached']['wall_ms']:.2f}× |")
    epoch_rows = [r for r in rows.values() if r["method"] == "epoch" and "error" not in r]
    if epoch_rows:
        lines += ["", "## Whole KD epochs through the engine (`fit`), without and with `teacher.cache`", "",
                  "Synthetic 32×32 data; each epoch is the listed number of training batches plus one validation batch and "
                  "the checkpoint writes; medians of alternating runs.", "",
                  "| pair | batches | train images/s (teacher) | train images/s (cache) | **speed-up (images/s)** | "
                  "process CPU s (teacher) | process CPU s (cache) | speed-up (CPU) | load |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in epoch_rows:
            t, c = r["median"]["teacher"], r["median"]["cache"]
            lines.append(f"| {r['pair']} | {r['batches']} | {t['images_per_s']:.1f} | {c['images_per_s']:.1f} | "
                         f"**{c['images_per_s'] / t['images_per_s']:.2f}×** | {t['cpu_s']:.1f} | {c['cpu_s']:.1f} | "
                         f"{t['cpu_s'] / c['cpu_s']:.2f}× | {r['load'][0][0]:.1f}→{r['load'][1][0]:.1f} |")
    teacher_rows = [r for r in rows.values() if r["method"] == "teacher" and "error" not in r]
    if teacher_rows:
        lines += ["", "## Teacher pass: fp32, channels_last, bf16 autocast (`teacher.precision=bf16`)", "",
                  "| pair | fp32 CPU ms | channels_last CPU ms | bf16 CPU ms | channels_last max |Δlogit| | bf16 top-1 agreement with fp32 | load |",
                  "|---|---|---|---|---|---|---|"]
        for r in teacher_rows:
            t = r["times"]
            a = r.get("agreement")
            if a and "flipped_fp32_margins" in a:
                m = a["flipped_fp32_margins"]
                agree = (f"{100 * a['top1_agree']:.2f}% of {a['images']} images ({a['note']}; top-1 fp32 "
                         f"{100 * a['fp32_top1']:.1f}%, bf16 {100 * a['bf16_top1']:.1f}%; {len(m)} flipped, their fp32 "
                         f"top-1 margins {', '.join(f'{v:.3f}' for v in m[:8])}{' …' if len(m) > 8 else ''} vs median "
                         f"{a['median_fp32_margin']:.2f}; max |Δlogit| {a['max_abs_logit_diff']:.3f})")
            elif a:
                agree = f"{100 * a['top1_agree']:.2f}% of {a['images']} images ({a['note']}; fp32 top-1 {100 * a['fp32_top1']:.1f}%)"
            else:
                agree = "not measured (no trained teacher for this pair)"
            lines.append(f"| {r['pair']} | {fmt(t['fp32']['cpu_ms'])} | {fmt(t['channels_last']['cpu_ms'])} | {fmt(t['bf16']['cpu_ms'])} | "
                         f"{r['channels_last_max_abs_diff']:.2e} | {agree} | {r['load'][0][0]:.1f}→{r['load'][1][0]:.1f} |")
    errors = [f"- {k}: {r['error']}" for k, r in sorted(rows.items()) if "error" in r]
    if errors:
        lines += ["", "## Rows that failed", "", *errors]
    path.write_text("\n".join(lines) + "\n")

