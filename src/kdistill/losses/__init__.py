"""Loss functions usable in anyone's own training loop (each documented with its formula)."""

from kdistill.losses.at import at_loss
from kdistill.losses.crd import ContrastMemory, CRDLoss, crd_nce_loss
from kdistill.losses.dkd import dkd_loss
from kdistill.losses.dml import mutual_kl
from kdistill.losses.ffsd import attention_map, diversity_loss, diversity_target, ffsd_warmup, normalized_distance
from kdistill.losses.fitnet import fitnet_loss
from kdistill.losses.hcl import hcl_loss
from kdistill.losses.hkd import GraphConv1Hop, hkd_losses, knn_graph, memory_infonce, normalized_adjacency
from kdistill.losses.kd import kd_loss
from kdistill.losses.mcl import mcl_losses, mcl_okd_nce, supcon_matrix_loss
from kdistill.losses.meal import discriminator_loss, fooling_loss, meal_align, similarity_loss, soft_cross_entropy
from kdistill.losses.memory import ContrastSampler, MemoryBank
from kdistill.losses.nst import nst_loss
from kdistill.losses.oekd import ensemble_logits, oekd_loss, oekd_widths
from kdistill.losses.pkt import pkt_loss
from kdistill.losses.rkd import rkd_loss
from kdistill.losses.sp import sp_loss
from kdistill.losses.vid import VIDLoss

__all__ = [
    "CRDLoss",
    "ContrastMemory",
    "VIDLoss",
    "ContrastSampler",
    "GraphConv1Hop",
    "MemoryBank",
    "attention_map",
    "diversity_loss",
    "diversity_target",
    "ensemble_logits",
    "ffsd_warmup",
    "hkd_losses",
    "knn_graph",
    "mcl_losses",
    "mcl_okd_nce",
    "memory_infonce",
    "mutual_kl",
    "normalized_adjacency",
    "normalized_distance",
    "oekd_loss",
    "oekd_widths",
    "supcon_matrix_loss",
    "crd_nce_loss",
    "at_loss",
    "dkd_loss",
    "fitnet_loss",
    "hcl_loss",
    "kd_loss",
    "discriminator_loss",
    "fooling_loss",
    "meal_align",
    "similarity_loss",
    "soft_cross_entropy",
    "nst_loss",
    "pkt_loss",
    "rkd_loss",
    "sp_loss",
]
