"""``Model``: a loaded model with static caches, and ``load()`` that builds one.

``ktcore.load(model, gguf=None, rules=None)`` takes an HF directory (config, tokenizer and
safetensors), or an HF directory for config and tokenizer plus GGUF weights (as
KTransformers' ``--model_path``/``--gguf_path``), or a GGUF alone (config and tokenizer from
its metadata). Without a rule file it uses the family's default for this host.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ktcore.errors import KtError
from ktcore.runtime.sampling import SamplingParams, sample
from ktcore.runtime.streamed_experts import DEFAULT_MIN_TOKENS as DEFAULT_STREAM_MIN_TOKENS
from ktcore.runtime.token_pipe import TokenPipe

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class Timings:
    """Wall-clock figures of the last ``generate`` call."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    def as_dict(self) -> dict:
        return {
            "prefill_tokens": self.prefill_tokens, "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": self.prefill_tokens / self.prefill_s if self.prefill_s else None,
            "decode_tokens": self.decode_tokens, "decode_s": self.decode_s,
            "decode_tokens_per_s": self.decode_tokens / self.decode_s if self.decode_s else None,
        }


@dataclass
class Model:
    decoder: "torch.nn.Module"
    config: object
    tokenizer: object | None
    plan: object
    prefill_chunk: int = 512
    #: prefill chunk while CPU experts stream to the GPU: every chunk copies every streamed
    #: layer's weights once, so fewer, larger chunks (a 4096-token prompt: one copy, not 8)
    stream_prefill_chunk: int = 4096
    _streaming: bool = False  # some CPU experts stream to a GPU for large batches
    timings: Timings = field(default_factory=Timings)
    graph_steps: dict = field(default_factory=dict)  # batch bucket -> captured GraphDecodeStep
    compile: bool = False  # decode step compiled with torch.compile(fullgraph=True)
    _compiled: object = None  # the compiled decoder of the eager decode step

    @property
    def max_len(self) -> int:
        return self.decoder.max_len

    @property
    def max_batch(self) -> int:
        """Sequences ``generate_batch`` can run together (cache rows)."""
        return self.decoder.batch

    @property
    def graph_step(self):
        """The captured single-sequence decode step, if any."""
        return self.graph_steps.get(1)

    def bucket(self, n: int) -> int:
        """The batch a decode step of n sequences runs with: the next power of two, at most
        ``max_batch`` (one captured graph per bucket)."""
        return min(1 << (n - 1).bit_length(), self.max_batch)

    def _check_length(self, n: int) -> None:
        if n > self.max_len:
            raise KtError(f"sequence of {n} tokens exceeds the cache length {self.max_len} (load with max_seq_len=...)")

    def _prefill(self, ids: torch.Tensor, last_only: bool, slot: int = 0) -> torch.Tensor:
        """ids: [T] -> logits [T, V] (or [1, V]); fills cache row ``slot`` in chunks of
        ``prefill_chunk``."""
        outputs = []
        size = max(self.prefill_chunk, self.stream_prefill_chunk) if self._streaming else self.prefill_chunk
        for start in range(0, ids.numel(), size):
            chunk = ids[start:start + size][None]  # [1, C]
            end = start + chunk.shape[1]
            positions = torch.arange(start, end)[None]  # [1, C]
            lens = torch.tensor([end])
            final = end == ids.numel()
            logits = self.decoder(chunk, positions, lens, last_only=last_only, slot=slot)  # [1, C or 1, V]
            if final or not last_only:
                outputs.append(logits[0])
        return torch.cat(outputs)

    @torch.inference_mode()
    def logits(self, ids) -> torch.Tensor:
        """Logits ``[T, vocab]`` (fp32, on the CPU) of every position of ``ids``."""
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        self._check_length(ids.numel())
        return self._prefill(ids, last_only=False).float().cpu()

    def _decode_step(self, use_graph: bool | None, batch: int = 1):
        """``step(tokens[B], positions[B]) -> logits[B, V]`` for a batch bucket: a captured
        CUDA graph where the model allows one (``use_graph`` None: whenever it does), else the
        eager decoder."""
        from ktcore.runtime.cuda_graph import GraphDecodeStep, graph_device

        device, reason = graph_device(self.decoder) if use_graph is not False else (None, "")
        if use_graph and device is None:
            raise KtError(f"cannot decode with a CUDA graph: {reason}")
        if device is None:
            forward = self.decoder
            if self.compile:
                if self._compiled is None:
                    self._compiled = compile_decoder(self.decoder)
                forward = self._compiled

            def eager(tokens, positions):
                positions = positions.cpu()
                return forward(tokens[:, None].cpu(), positions[:, None], positions + 1)[:, -1]
            return eager
        if batch not in self.graph_steps:
            self.graph_steps[batch] = GraphDecodeStep(self.decoder, device, batch=batch, compile=self.compile)
        return self.graph_steps[batch].step

    def routers(self) -> list:
        from ktcore.ops.router import Router

        return [m for m in self.decoder.modules() if isinstance(m, Router)]

    def set_experts_per_token(self, n: int | None) -> None:
        """Runs ``n`` routed experts per token instead of the config's count (None: restore
        it); see ``Router.set_active_top_k``. A captured decode graph is captured again."""
        for router in self.routers():
            router.set_active_top_k(n)
        self.release_graph()

    def set_stream_min_tokens(self, n: int | None) -> None:
        """Prefill batches of at least ``n`` tokens on a GPU run the CPU experts that can stream
        there, their weights copied over PCIe chunk by chunk (0 or None: never); see
        ktcore.runtime.streamed_experts. The layers share one StreamPool per device."""
        from ktcore.runtime.blocks import ExpertsParts

        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise KtError(f"stream_min_tokens must be a non-negative int or None, got {n!r}")
        layers = [m for m in self.decoder.modules() if isinstance(m, ExpertsParts)]
        pools = next((m.stream_pools for m in layers if m.stream_pools is not None), {})
        for layer in layers:
            layer.stream_min_tokens = n
            layer.stream_pools = pools
        self._streaming = bool(n) and self.streaming_unavailable() is None

    def streaming_unavailable(self) -> str | None:
        """Why prefill cannot stream CPU experts to a GPU, or None when it can."""
        from ktcore.runtime.blocks import ExpertsParts, MoEBlock, device_of

        if not torch.cuda.is_available():
            return "no CUDA device"
        for block in self.decoder.modules():
            if isinstance(block, MoEBlock) and isinstance(block.experts, ExpertsParts):
                if device_of(block.gate).type == "cuda" and any(
                        block.experts.streamed(i) is not None for i in range(len(block.experts.parts))):
                    return None
        return "no CPU experts that stream, in a layer on a GPU"

    def release_graph(self) -> None:
        """Drops the captured decode graphs (and the host runners they share)."""
        for step in self.graph_steps.values():
            step.release()
        self.graph_steps = {}

    @torch.inference_mode()
    def generate(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seed: int | None = None, stop_ids=None, use_graph: bool | None = None) -> list[int]:
        """Generated token ids (the prompt not included); stops early at a stop token
        (default: the tokenizer's end-of-sequence token), which is included. ``use_graph``:
        replay the decode step as a CUDA graph (None: whenever the model allows one)."""
        return self.generate_batch([prompt_ids], max_new_tokens, temperature, top_p, top_k, seed, stop_ids,
                                   use_graph)[0]

    @torch.inference_mode()
    def generate_batch(self, prompts, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                       top_k: int = 0, seed: int | None = None, stop_ids=None,
                       use_graph: bool | None = None) -> list[list[int]]:
        """``generate`` for up to ``max_batch`` prompts at once: each is prefilled into its own
        cache row, then one decode step (captured per batch bucket) advances all of them."""
        params = SamplingParams(temperature, top_p, top_k, seed)
        prompts = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in prompts]
        if not prompts or len(prompts) > self.max_batch:
            raise KtError(f"give 1 to {self.max_batch} prompts (load with max_batch=... for more), got {len(prompts)}")
        if any(p.numel() == 0 for p in prompts):
            raise KtError("a prompt is empty")
        for p in prompts:
            self._check_length(p.numel() + max_new_tokens)
        if stop_ids is None:
            eos = getattr(self.tokenizer, "eos_token_id", None)
            stop_ids = [] if eos is None else [eos]
        stop = set(int(s) for s in stop_ids)
        n, batch = len(prompts), self.bucket(len(prompts))
        step = self._decode_step(use_graph, batch)  # captured before prefill: capture resets the caches
        self.timings = Timings(prefill_tokens=sum(p.numel() for p in prompts))
        start = time.perf_counter()
        last = torch.cat([self._prefill(p, last_only=True, slot=i)[-1:] for i, p in enumerate(prompts)])  # [n, V]
        generator = None
        if seed is not None:  # on the device that samples
            generator = torch.Generator(device=last.device)
            generator.manual_seed(seed)
        tokens = sample(last, params, generator)  # [n]
        outs = [[t] for t in tokens.tolist()]
        self.timings.prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        device = tokens.device
        positions = torch.tensor([p.numel() for p in prompts] + [0] * (batch - n), device=device)  # [batch]; spare rows idle
        tokens = torch.cat([tokens, tokens.new_zeros(batch - n)])  # [batch]
        done = [len(o) >= max_new_tokens or o[-1] in stop for o in outs]
        pipe = TokenPipe(batch, device)
        steps = max_new_tokens - 1  # each step gives every row a token; the first came from prefill
        while not all(done):
            if steps and len(pipe) < 2:  # step i + 1 is queued before the tokens of step i are read
                logits = step(tokens, positions)  # [batch, V]
                tokens = sample(logits, params, generator)  # [batch]
                positions[:n] += 1
                pipe.push(tokens)
                steps -= 1
                continue
            for i, token in enumerate(pipe.pop()[:n]):
                if not done[i]:
                    outs[i].append(token)
                    done[i] = len(outs[i]) >= max_new_tokens or token in stop
        self.timings.decode_tokens = sum(len(o) - 1 for o in outs)
        self.timings.decode_s = time.perf_counter() - start
        if pipe.on_cuda:  # a step thrown away after a stop token may still run
            torch.cuda.current_stream(device).synchronize()
        if batch in self.graph_steps and step == self.graph_steps[batch].step:
            self.graph_steps[batch].check_cpu_experts()
        return outs


def compile_decoder(decoder):
    """``torch.compile(fullgraph=True)`` of a decoder for the decode step. Every model's
    decoder shares ``Decoder.forward``'s code object, whose compilations dynamo counts together,
    so the recompile limit is raised to let a process hold several models."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(decoder, fullgraph=True, dynamic=False)


def _default_rules(arch: str) -> str:
    return f"{arch}-gpu" if torch.cuda.is_available() else f"{arch}-cpu"


def load(model: str | Path | None = None, gguf: str | Path | None = None, rules: str | Path | None = None,
         dtype: str | torch.dtype | None = None, max_seq_len: int | None = None, registry=None,
         progress: bool = False, store=None, config=None, tokenizer=None,
         experts_per_token: int | None = None, compile: bool = False, max_batch: int = 1,
         stream_min_tokens: int | None = DEFAULT_STREAM_MIN_TOKENS) -> Model:
    """Loads a model; see the module docstring. ``store``/``config``/``tokenizer`` let callers
    pass weights already in memory (synthetic models, a transformers model's state).
    ``experts_per_token`` runs fewer routed experts per token than the config (see
    ``Model.set_experts_per_token``). ``compile``: the decode step is compiled with
    ``torch.compile(fullgraph=True)`` (and then captured, where a CUDA graph is used).
    ``max_batch``: sequences ``generate_batch`` runs together (one cache row each).
    ``stream_min_tokens``: prefill chunks of at least this many tokens run streamable CPU
    experts on the GPU (0 or None: never; see ``Model.set_stream_min_tokens``)."""
    from ktcore.backends.registry import Registry
    from ktcore.rules.placement import ModelInventory, check_rules
    from ktcore.rules.shipped import resolve_rule_path
    from ktcore.runtime.build import Builder
    from ktcore.runtime.decoder import Decoder

    if model is None and gguf is None and store is None:
        raise KtError("give a model directory, a GGUF file, or both")
    if config is None:
        config, tokenizer_from = _config_and_tokenizer(model, gguf)
        tokenizer = tokenizer if tokenizer is not None else tokenizer_from
    if store is None:  # every tensor is checked against the config here, before anything is built
        store = _open_store(model, gguf, config)
    registry = registry or Registry.from_entry_points()
    rule_path = resolve_rule_path(str(rules) if rules else _default_rules(config.model_type))
    inventory = ModelInventory.from_config(config, str(model or gguf or "<memory>"))
    plan = check_rules(rule_path, registry, inventory)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise KtError(f"unknown dtype {dtype!r}; one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    dtype = dtype or torch.float32
    max_len = int(max_seq_len or min(getattr(config, "max_position_embeddings", 4096), 4096))
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise KtError(f"max_batch must be a positive int, got {max_batch!r}")
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    if experts_per_token is not None and not (isinstance(experts_per_token, int) and 1 <= experts_per_token <= top_k):
        raise KtError(f"experts_per_token must be between 1 and the config's num_experts_per_tok ({top_k}), "
                      f"got {experts_per_token!r}")
    _check_memory(plan, dtype)
    _libc_call("mallopt", _M_MMAP_THRESHOLD, 1 << 20)
    bar = _progress_bar(len(store.names())) if progress else None
    builder = Builder(config, store, plan, registry, dtype, max_len, (lambda name: bar.update(1)) if bar else None)
    skeleton = builder.build()
    if bar is not None:
        bar.close()
    if hasattr(store, "close"):
        store.close()
    _libc_call("malloc_trim", 0)
    decoder = Decoder(skeleton, config, batch=max_batch, max_len=max_len, cache_dtype=dtype)
    model = Model(decoder, config, tokenizer, plan, compile=compile)
    if experts_per_token is not None:
        model.set_experts_per_token(experts_per_token)
    model.set_stream_min_tokens(stream_min_tokens)
    return model


def _config_and_tokenizer(model, gguf):
    from ktcore.models.skeleton import load_config

    if model is not None:
        from transformers import AutoTokenizer

        config = load_config(model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model))
        except (OSError, ValueError) as exc:
            log.warning("%s: no usable tokenizer (%s); token ids only", model, exc)
            tokenizer = None
        return config, tokenizer
    from ktcore.formats.gguf_read import config_from_gguf, tokenizer_from_gguf

    return config_from_gguf(gguf), tokenizer_from_gguf(gguf)


def _open_store(model, gguf, config):
    if gguf is not None:
        from ktcore.formats.gguf_read import GGUFStore

        return GGUFStore(gguf, config=config)
    from ktcore.formats.safetensors_store import SafetensorsStore

    return SafetensorsStore(model, config=config)


def _check_memory(plan, dtype: torch.dtype) -> None:
    """Refuses to start loading when the plan's host share exceeds the available memory."""
    from ktcore.rules.explain import device_totals, rows

    need = device_totals(rows(plan)).get("cpu", 0)
    need = int(need * torch.finfo(dtype).bits / 16)  # explain counts the checkpoint dtype (bf16)
    available = _mem_available()
    if available is not None and need > available:
        raise KtError(f"not enough host memory: the plan puts {need / 2**30:.1f} GiB of weights on the CPU, "
                      f"{available / 2**30:.1f} GiB are available")


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _libc_call(name: str, *args: int) -> None:
    """Allocator hints for streaming a model in: ``mallopt(M_MMAP_THRESHOLD, 1 MiB)`` keeps
    glibc from raising its mmap threshold as large buffers are freed (which would leave the
    loading temporaries fragmenting the heap), and ``malloc_trim(0)`` hands freed memory back
    after loading. A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("c")
    try:
        getattr(ctypes.CDLL(library), name)(*args)
    except (OSError, AttributeError, TypeError):
        pass


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="loading weights", unit="tensor")
