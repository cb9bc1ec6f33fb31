"""The MGLL objective and the CLIP baseline (METHOD.md section 3).

``MGLLLoss`` replaces CLIP's identity targets with label co-occurrence targets, per granularity
level, and adds a point-wise sigmoid term and a smooth-KL agreement term across levels. Both
losses own their distributed behaviour: under ``torch.distributed`` they gather embeddings
(with gradient) and labels from every rank, so the value equals the single-process loss on the
global batch and the training loop never special-cases it.

The package, in reading order: ``labels`` (label tensors, positive masks), ``batch`` (inputs
normalised and gathered), ``modules`` (the two ``nn.Module`` losses: each builds a plan of
logit matrices), ``plan`` (what a plan holds), ``kernel`` (the autograd function that computes
every term and writes its gradient by hand). It is a leaf: it imports only torch and
``mgll.distributed``.

Names without an underscore in those modules are shared inside the package; what the package
offers is ``__all__`` here.
"""

from mgll.losses.batch import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE, MAX_LOGIT_SCALE
from mgll.losses.labels import LabelKey, encode_labels, label_presence, positive_mask
from mgll.losses.modules import DEFAULT_WEIGHTS, MGLL_TERMS, CLIPLoss, MGLLLoss

__all__ = [
    "DEFAULT_WEIGHTS",
    "INIT_LOGIT_BIAS",
    "INIT_LOGIT_SCALE",
    "MAX_LOGIT_SCALE",
    "MGLL_TERMS",
    "CLIPLoss",
    "LabelKey",
    "MGLLLoss",
    "encode_labels",
    "label_presence",
    "positive_mask",
]
