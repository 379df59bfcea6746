"""The vLLM-shaped entry point: ``LLM("smollm2-135m").generate(prompts, SamplingParams(...))``.

It loads the model (or takes one), builds an :class:`~labkit.serve.engine.LLMEngine`, feeds it the prompts and
steps until every request is finished, with a progress bar showing live output tokens/s.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from labkit import LabkitError
from labkit.serve.config import EngineConfig
from labkit.serve.engine import LLMEngine
from labkit.serve.outputs import EngineStats, RequestOutput
from labkit.serve.sampling import SamplingParams


class LLM:
    """vLLM-shaped entry point: ``LLM("smollm2-135m").generate(prompts, SamplingParams(...))``."""

    def __init__(self, model: str | torch.nn.Module = "smollm2-135m", tokenizer: Any = None, *,
                 device: str | torch.device | None = None, dtype: torch.dtype | str = "auto",
                 record_history: bool = False, **engine_args: Any) -> None:
        """``dtype`` (vLLM's argument): ``"auto"`` loads a named model in bf16 where the device multiplies bf16
        natively and in fp32 elsewhere (:func:`labkit.env.auto_dtype`, which says why); a model handed in keeps its
        own dtype under ``"auto"``, and any other value must match it. ``engine_args`` are :class:`EngineConfig`
        fields (``block_size``, ``num_blocks``, ``max_num_seqs``, ``max_model_len``, ``paged``, ``kv_reservation``,
        ...), checked before the model loads. ``record_history``
        turns on KV telemetry: every step walks the block tables to count waste (``stats.kv_waste_pct``,
        ``stats.waste_breakdown_pct()``) and keeps a snapshot (``stats.history``, the KV viewer's input); off, a
        step pays for none of it."""
        from labkit import env, zoo

        config = EngineConfig.from_kwargs(**engine_args)
        if isinstance(model, str):
            dev = env.resolve_device(device)
            model, tokenizer = zoo.load_causal_lm(model, dtype=env.resolve_dtype(dtype, dev), device=dev,
                                                  progress=False)
        else:
            _check_model_dtype(model, dtype)
            if device is not None:  # a model handed in goes where the caller asked, KV pool and all
                model.to(env.resolve_device(device))
        self.tokenizer = tokenizer
        self.engine = LLMEngine(model, tokenizer, config, record_history=record_history)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the engine computes and keeps its KV cache in (``kv_cache_dtype="auto"``)."""
        return self.engine.model.dtype

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (``tensor_parallel_size > 1``); a no-op otherwise."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset_stats(self) -> None:
        """Fresh counters (steps, waste, preemptions) before a repeated run on the same engine."""
        self.engine.reset_stats()

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LabkitError("text prompts need a tokenizer; pass token id lists instead")
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return list(prompt)

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise LabkitError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
        ids = [self.engine.add_request(self._encode(p), sp) for p, sp in zip(prompts, plist)]
        wanted = set(ids)
        outputs: dict[int, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm)
        n_tokens, t0 = 0, time.perf_counter()
        while self.engine.has_unfinished():
            for out, _ in self.engine.step():
                n_tokens += 1
                if out.finished and out.request_id in wanted and out.request_id not in outputs:
                    outputs[out.request_id] = out
                    bar.update(1)
            bar.set_postfix(out_tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f}")
        bar.close()
        result = [outputs[i] for i in ids]
        if self.tokenizer is not None:
            for o in result:
                for sample in o.samples or [o]:
                    sample.text = self.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
        return result


def _check_model_dtype(model: torch.nn.Module, dtype: torch.dtype | str) -> None:
    """A model handed in is not cast behind the caller's back (it may be shared): ``"auto"`` keeps its dtype and an
    explicit ``dtype`` must be the one its weights already have."""
    from labkit import env

    if isinstance(dtype, str) and dtype == "auto":
        return
    wanted = env.resolve_dtype(dtype)
    have = next(model.parameters()).dtype
    if have != wanted:
        raise LabkitError(f"dtype={env.dtype_name(wanted)!r} but the model handed in is {env.dtype_name(have)}: "
                          f"cast it first (model.to(torch.{env.dtype_name(wanted)})), load it by name, or pass "
                          "dtype='auto' to serve it as it is")
