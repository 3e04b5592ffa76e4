"""MoE routers: hidden states -> (top-k expert ids, top-k weights).

Three kinds, each matching transformers' own router modules bit for bit in fp32:

- ``softmax_topk`` — softmax over all experts, top-k, optional renormalisation
  (Qwen2-MoE, Qwen3-MoE, Mixtral; DeepSeek-V2 ``topk_method="greedy"``).
- ``group_limited`` — DeepSeek-V2 ``group_limited_greedy``: softmax, keep the ``topk_group``
  groups with the highest single expert score, top-k inside them.
- ``noaux_tc`` — DeepSeek-V3: sigmoid scores, selection on scores plus
  ``e_score_correction_bias``, groups ranked by the sum of their two best biased scores,
  weights are the unbiased scores of the chosen experts, optionally renormalised.

Every kind then multiplies by ``routed_scaling_factor``. ``forward(x[T,H])`` returns
``topk_ids[T,K]`` int32 and ``topk_weights[T,K]`` fp32, ordered by selection score (highest
first), with no host synchronisation (capture-safe). Parameter names (``weight`` ``[E,H]``,
``e_score_correction_bias`` ``[E]``) are transformers', so ``load_state_dict`` of an HF
router module's state dict works.

On CUDA, for at most ``ROUTER_KERNEL_MAX_TOKENS`` tokens (decode), ``softmax_topk`` and
``noaux_tc`` routers run all of this in one Triton kernel (``ktcore.ops.router_kernel``),
eager and compiled alike, so eager and captured decode pick the same experts; it follows the
tie and NaN rules of ``small_topk``.

Every top-k among experts goes through ``topk_experts``: compiled for CUDA, for few tokens
(decode), it ranks the experts by comparisons (``small_topk``), which Inductor fuses into
plain reductions, instead of ``torch.topk``'s select and sort kernels; eager, on the CPU and
for many tokens it is ``torch.topk``. The same experts either way, except where scores tie:
``small_topk`` takes the lower expert index first, ``torch.topk`` leaves it unspecified. NaN
scores: a NaN ranks above every number on both paths, so a token whose scores are all NaN
gets experts ``0..K-1`` (``small_topk``; K distinct valid ids from ``torch.topk``) with NaN
weights.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ktcore.errors import KtError

logger = logging.getLogger(__name__)

ROUTER_KINDS = ("softmax_topk", "group_limited", "noaux_tc")

#: ``model_type`` values ``router_spec_from_config`` understands.
SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "qwen2_moe", "qwen3_moe", "mixtral")


@dataclass(frozen=True)
class RouterSpec:
    """How one MoE layer picks its experts.

    ``fp32_logits``: compute the router projection in fp32 (DeepSeek) rather than in the
    input dtype (Qwen, Mixtral — transformers does so, and matching it keeps the same experts
    chosen in bf16).
    """

    kind: str
    num_experts: int
    hidden_size: int
    top_k: int
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    fp32_logits: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"RouterSpec.kind {self.kind!r} is not one of {', '.join(ROUTER_KINDS)}")
        for field in ("num_experts", "hidden_size", "top_k", "n_group", "topk_group"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RouterSpec.{field} must be a positive int, got {value!r}")
        for field in ("norm_topk_prob", "fp32_logits"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"RouterSpec.{field} must be a bool, got {getattr(self, field)!r}")
        scale = self.routed_scaling_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"RouterSpec.routed_scaling_factor must be a positive finite number, got {scale!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"RouterSpec.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.kind == "softmax_topk":
            return
        if self.num_experts % self.n_group:
            raise ValueError(f"RouterSpec: num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"RouterSpec.topk_group={self.topk_group} exceeds n_group={self.n_group}")
        if self.top_k > self.topk_group * self.group_size:
            raise ValueError(
                f"RouterSpec: top_k={self.top_k} exceeds the {self.topk_group} groups x "
                f"{self.group_size} experts that group-limited routing can choose from"
            )

    @property
    def group_size(self) -> int:
        return self.num_experts // self.n_group


#: Largest ``scores.numel() * E`` (comparisons) for which a compiled ``topk_experts`` ranks by
#: comparisons: up to 16 tokens among 256 experts, 64 among 128, 256 among 64.
SMALL_TOPK_MAX_ELEMENTS = 1 << 20


def expert_rank(scores: torch.Tensor) -> torch.Tensor:
    """``int64[..., E]``: each expert's place along the last dim of ``scores``, best first (0).

    rank[..., e] = how many experts j come before e: a higher score, or an equal score and
    j < e (ties go to the lower expert index), and NaN before every number (where torch.topk
    puts it), NaNs among themselves by index. A strict total order, so the ranks along the
    last dim are a permutation of ``0..E-1``. Static shapes and no host sync: ``numel * E``
    comparisons that Inductor reduces without materialising them.
    """
    E = scores.shape[-1]
    s_e, s_j = scores[..., :, None], scores[..., None, :]  # [..., E, 1] (e), [..., 1, E] (j)
    nan_e, nan_j = s_e.isnan(), s_j.isnan()
    index = torch.arange(E, device=scores.device)
    j_lower = index[None, :] < index[:, None]  # [E, E]: j < e
    tied = (s_j == s_e) | (nan_j & nan_e)  # [..., E, E]
    before = (s_j > s_e) | (nan_j & ~nan_e) | (tied & j_lower)  # [..., E, E]: j comes before e
    return before.sum(dim=-1)  # [..., E]


def small_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [..., k], ids [..., k] int64)`` of ``scores [..., E]``, highest first, by ranks.

    The same as ``torch.topk(scores, k, dim=-1)`` where the scores have no ties; equal scores
    come lower expert index first (torch.topk leaves their order unspecified), and a NaN score
    is taken before every number, with value NaN, as torch.topk does (``expert_rank``).
    """
    E = scores.shape[-1]
    rank = expert_rank(scores)  # [..., E]
    hit = rank[..., None, :] == torch.arange(k, device=scores.device)[:, None]  # [..., k, E]: one-hot
    ids = torch.where(hit, torch.arange(E, device=scores.device), 0).sum(dim=-1)  # [..., k]
    values = torch.where(hit, scores[..., None, :], float("-inf")).amax(dim=-1)  # [..., k]
    return values, ids


def small_topk_is_cheap(scores: torch.Tensor) -> bool:
    """Whether ranking ``scores [..., E]`` by comparisons costs at most SMALL_TOPK_MAX_ELEMENTS."""
    return scores.numel() * scores.shape[-1] <= SMALL_TOPK_MAX_ELEMENTS


def uses_small_topk(scores: torch.Tensor) -> bool:
    """Whether ``topk_experts`` ranks ``scores`` by comparisons: only while torch.compile traces
    for CUDA (Inductor fuses the comparisons into small reductions there; eager, or compiled for
    the CPU, they are far slower than torch.topk), and only where that is cheap. Decided at
    trace time: device and shapes are static."""
    return torch.compiler.is_compiling() and scores.device.type == "cuda" and small_topk_is_cheap(scores)


def topk_experts(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, ids int64)``: ``torch.topk(scores [..., E], k, dim=-1)``, by ``small_topk`` in
    a compiled decode step (``uses_small_topk``)."""
    if uses_small_topk(scores):
        return small_topk(scores, k)
    values, ids = torch.topk(scores, k, dim=-1)
    return values, ids


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``BoolTensor[T, E]``: True for the ``k`` highest scores of each row."""
    if uses_small_topk(scores):
        return expert_rank(scores) < k
    best = torch.topk(scores, k, dim=-1, sorted=False)[1]  # [T, k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, best, True)


#: Most tokens and experts for which a router with a kernel routes by it.
ROUTER_KERNEL_MAX_TOKENS = 16
ROUTER_KERNEL_MAX_EXPERTS = 512


def triton_is_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_router_kernel(x: torch.Tensor, spec: RouterSpec) -> bool:
    """Whether a router whose kind has a kernel (and triton) routes ``x [T, H]`` by it
    (``ktcore.ops.router_kernel``): on CUDA, for few tokens and at most 512 experts. Decided
    from device and shapes (static under torch.compile)."""
    return (x.device.type == "cuda" and x.shape[0] <= ROUTER_KERNEL_MAX_TOKENS
            and spec.num_experts <= ROUTER_KERNEL_MAX_EXPERTS)


class Router(nn.Module):
    """Base router: the ``weight [E, H]`` projection and the shared top-k tail.

    ``has_kernel``: the kind has a one-kernel path. ``kernel_ready`` (set at construction, so
    that torch.compile never traces the import machinery): it has one and triton is
    installed; such a router holds the kernel's finish counter ``kernel_counter`` (int32 [1],
    0 between launches, not part of the state dict)."""

    has_kernel = False

    def __init__(self, spec: RouterSpec, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(spec, RouterSpec):
            raise TypeError(f"{type(self).__name__} needs a RouterSpec, got {type(spec).__name__}")
        self.spec = spec
        self.weight = nn.Parameter(
            torch.zeros(spec.num_experts, spec.hidden_size, device=device, dtype=dtype), requires_grad=False
        )
        self.active_top_k = spec.top_k  # fewer experts per token: see set_active_top_k
        self.kernel_ready = self.has_kernel and triton_is_installed()
        if self.kernel_ready:
            self.register_buffer("kernel_counter", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)

    def set_active_top_k(self, n: int | None) -> None:
        """Runs the first ``n`` of the ``top_k`` chosen experts (None: all of them).

        The output keeps its ``[T, top_k]`` shape: the dropped places get the padding id
        ``num_experts`` with weight 0, which every Experts backend skips. The kept weights are
        renormalised over the ``n`` kept experts when the config renormalises top-k weights.
        """
        n = self.spec.top_k if n is None else n
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.spec.top_k:
            raise ValueError(f"experts per token must be an int in [1, {self.spec.top_k}], got {n!r}")
        self.active_top_k = n

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.spec.hidden_size)  # [T, H]
        if self.spec.fp32_logits:
            return F.linear(x.float(), self.weight.float())  # [T, E] fp32
        return F.linear(x, self.weight.to(x.dtype))  # [T, E] in x's dtype

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E] fp32

    def choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [T,K] int64, weights [T,K] fp32) before renormalisation and scaling."""
        weights, ids = topk_experts(scores, self.spec.top_k)
        return ids, weights

    def kernel_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` of ``x [T, H]`` by the Triton kernel."""
        from ktcore.ops.router_kernel import router_topk  # imports triton: only on this path

        s = self.spec
        bias = getattr(self, "e_score_correction_bias", None)
        return router_topk(x, self.weight, bias, self.kernel_counter, s.top_k, self.active_top_k, s.norm_topk_prob,
                           float(s.routed_scaling_factor), s.fp32_logits, s.n_group, s.topk_group)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x2d = x.reshape(-1, self.spec.hidden_size)  # [T, H]
        if self.kernel_ready and uses_router_kernel(x2d, self.spec):
            return self.kernel_forward(x2d)
        scores = self.scores(self.logits(x))  # [T, E] fp32
        ids, weights = self.choose(scores)  # [T, K], [T, K] in routing order
        n, K = self.active_top_k, self.spec.top_k
        if n < K:  # the last K - n places: padding id E with weight 0
            # (torch.where, not slice + pad: a compiled CUDA step padded the weights but left
            # the ids of a slice + F.pad as they were, so the CPU experts still ran all K)
            keep = torch.arange(K, device=ids.device) < n  # [K]
            ids = torch.where(keep, ids, self.spec.num_experts)
            weights = torch.where(keep, weights, 0.0)
        if self.spec.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.spec.routed_scaling_factor != 1.0:
            weights = weights * self.spec.routed_scaling_factor
        return ids.to(torch.int32), weights.float()

    def extra_repr(self) -> str:
        active = f", active_top_k={self.active_top_k}" if self.active_top_k != self.spec.top_k else ""
        return f"spec={self.spec}{active}"


class SoftmaxTopKRouter(Router):
    """Softmax over all experts, then top-k (Qwen-MoE, Mixtral, DeepSeek-V2 greedy)."""

    has_kernel = True


def group_mask(group_scores: torch.Tensor, topk_group: int, group_size: int) -> torch.Tensor:
    """``BoolTensor[T, E]``: True for the experts of the ``topk_group`` best groups."""
    keep = topk_mask(group_scores, topk_group)  # [T, G]
    return keep.repeat_interleave(group_size, dim=1)  # [T, E]


class GroupLimitedRouter(Router):
    """DeepSeek-V2 ``group_limited_greedy``: groups ranked by their best expert's score."""

    def choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        if s.topk_group < s.n_group:  # else every group is kept
            grouped = scores.view(-1, s.n_group, s.group_size)  # [T, G, E/G]
            keep = group_mask(grouped.amax(dim=-1), s.topk_group, s.group_size)  # [T, E]
            scores = scores.masked_fill(~keep, 0.0)  # [T, E]; transformers masks with 0, not -inf
        weights, ids = topk_experts(scores, s.top_k)
        return ids, weights


class NoAuxTCRouter(Router):
    """DeepSeek-V3 ``noaux_tc``: sigmoid, bias-corrected group-limited choice."""

    has_kernel = True

    def __init__(self, spec: RouterSpec, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__(spec, device, dtype)
        self.register_buffer("e_score_correction_bias", torch.zeros(spec.num_experts, device=device))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid()  # [T, E] fp32

    def choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        biased = scores + self.e_score_correction_bias.float()  # [T, E]
        if s.topk_group < s.n_group:  # else every group is kept
            grouped = biased.view(-1, s.n_group, s.group_size)  # [T, G, E/G]
            best2 = topk_experts(grouped, min(2, s.group_size))[0].sum(dim=-1)  # [T, G]
            keep = group_mask(best2, s.topk_group, s.group_size)  # [T, E]
            biased = biased.masked_fill(~keep, float("-inf"))  # [T, E]
        ids = topk_experts(biased, s.top_k)[1]  # [T, K]
        return ids, scores.gather(1, ids)  # weights: unbiased scores


_ROUTER_CLASSES: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopKRouter,
    "group_limited": GroupLimitedRouter,
    "noaux_tc": NoAuxTCRouter,
}


def build_router(spec: RouterSpec, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Router:
    """The router module of ``spec.kind`` (weights zero until loaded)."""
    return _ROUTER_CLASSES[spec.kind](spec, device=device, dtype=dtype)


def router_spec_from_config(hf_config: Any) -> RouterSpec:
    """The ``RouterSpec`` of a transformers config (or a model's text sub-config).

    Raises ``KtError`` for model types or routing methods that are not supported.
    """
    get_text_config = getattr(hf_config, "get_text_config", None)
    config = get_text_config() if callable(get_text_config) else hf_config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise KtError(f"no MoE router for model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")

    def need(name: str) -> Any:
        value = getattr(config, name, None)
        if value is None:
            raise KtError(f"{model_type} config: {name} is not set")
        return value

    hidden, top_k = need("hidden_size"), need("num_experts_per_tok")
    if model_type in ("qwen2_moe", "qwen3_moe", "mixtral"):
        mixtral = model_type == "mixtral"
        return RouterSpec(
            kind="softmax_topk",
            num_experts=need("num_local_experts" if mixtral else "num_experts"),
            hidden_size=hidden,
            top_k=top_k,
            norm_topk_prob=True if mixtral else bool(getattr(config, "norm_topk_prob", False)),
            fp32_logits=False,
        )
    if model_type == "deepseek_v2":
        method = getattr(config, "topk_method", "greedy") or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise KtError(f"deepseek_v2 config: topk_method {method!r} is not supported "
                          "(supported: greedy, group_limited_greedy)")
        if getattr(config, "norm_topk_prob", False):
            # transformers' DeepseekV2TopkRouter ignores it (always scales); so do we.
            logger.warning("deepseek_v2 config: norm_topk_prob=True is ignored, as in transformers")
        grouped = method == "group_limited_greedy"
        return RouterSpec(
            kind="group_limited" if grouped else "softmax_topk",
            num_experts=need("n_routed_experts"),
            hidden_size=hidden,
            top_k=top_k,
            n_group=need("n_group") if grouped else 1,
            topk_group=need("topk_group") if grouped else 1,
            routed_scaling_factor=float(getattr(config, "routed_scaling_factor", None) or 1.0),
            fp32_logits=True,
        )
    if model_type == "deepseek_v3":
        method = getattr(config, "topk_method", "noaux_tc") or "noaux_tc"
        scoring = getattr(config, "scoring_func", "sigmoid") or "sigmoid"
        if method != "noaux_tc" or scoring != "sigmoid":
            raise KtError(f"deepseek_v3 config: topk_method={method!r} scoring_func={scoring!r} is not "
                          "supported (supported: noaux_tc with sigmoid)")
        return RouterSpec(
            kind="noaux_tc",
            num_experts=need("n_routed_experts"),
            hidden_size=hidden,
            top_k=top_k,
            norm_topk_prob=bool(getattr(config, "norm_topk_prob", False)),
            n_group=getattr(config, "n_group", None) or 1,
            topk_group=getattr(config, "topk_group", None) or 1,
            routed_scaling_factor=float(getattr(config, "routed_scaling_factor", None) or 1.0),
            fp32_logits=True,
        )
    raise AssertionError(model_type)  # unreachable: SUPPORTED_MODEL_TYPES is checked above
