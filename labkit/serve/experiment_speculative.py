"""Speculative decoding (notebook 06's last part): n-gram prompt lookup and a draft model, against plain greedy
decoding in the same loop (:class:`labkit.decode.StaticDecoder`), on a workload where lookup pays (the output
copies the prompt) and one where it does not (a story). Every variant must give plain greedy's tokens exactly.

The draft is SmolLM2 with 20 of its 30 layers dropped (:func:`labkit.distill.layer_dropped_lm`), **not trained**:
it shows what an untrained draft costs; notebook 03's distillation is what would make it agree with the target.
Measurement follows the kit's rule: each variant warmed up once, then ``repeats`` rotated rounds
(:func:`labkit.measure.compare_latency`), median and spread; a speed-up is the ratio of medians against greedy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from labkit import env, measure, zoo
from labkit.data import sentences
from labkit.decode import StaticDecoder
from labkit.distill import layer_dropped_lm
from labkit.experiments.protocol import Target, check
from labkit.results import Record
from labkit.serve.speculative import generate

NAME = "speculative"  # `labkit run speculative`
NOTEBOOK = "06b_engine_throughput_server_speculation"


@dataclass
class Config:
    model: str = "smollm2-135m"
    new_tokens: int = 64
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    draft_keep: tuple[int, ...] = tuple(range(0, 5)) + tuple(range(25, 30))  # 10 of 30 layers, untrained
    repeats: int = 5
    device: str = env.device_field()

    @classmethod
    def quick(cls) -> Config:
        return cls(new_tokens=32, repeats=3)

    @classmethod
    def smallest(cls) -> Config:
        """Every code path at the least work (the GPU check's rehearsal and the device tests)."""
        return cls(new_tokens=4, num_speculative_tokens=2, draft_keep=(0,), repeats=1)


def copy_prompt(tok, passage: str) -> list[int]:
    """The model is asked to repeat ``passage``, and has begun to: prompt lookup finds what comes next."""
    return tok(f"Copy the text exactly.\nText: {passage}\nCopy: {' '.join(passage.split()[:4])}").input_ids


def copy_requests(tok, n: int, sentences_each: int = 3) -> list[list[int]]:
    """``n`` copy prompts, each over different sentences (a batch for the engine's speculation)."""
    text = sentences()
    return [copy_prompt(tok, " ".join(text[sentences_each * i:sentences_each * (i + 1)])) for i in range(n)]


def workloads(tok) -> dict[str, list[int]]:
    """``copy``: the model is asked to repeat a passage it was shown (:func:`copy_prompt`); ``free``: the start of
    a story (nothing in the prompt to copy)."""
    return {"copy": copy_prompt(tok, " ".join(sentences()[:6])),
            "free": tok("Once upon a time, in a small village by the sea,").input_ids}


def run(config: Config | None = None, progress: bool = True) -> Record:
    config = config or Config()
    device = env.resolve_device(config.device)
    model, tok = zoo.load_causal_lm(config.model, device=device, progress=False)
    keep = [i for i in config.draft_keep if i < model.config.num_hidden_layers]  # the rehearsal's model is shallower
    draft_model = layer_dropped_lm(model, keep=keep)
    prompts = workloads(tok)
    max_len = max(map(len, prompts.values())) + config.new_tokens + config.num_speculative_tokens + 1
    target, draft = StaticDecoder(model, max_len=max_len), StaticDecoder(draft_model, max_len=max_len)
    k = config.num_speculative_tokens
    specs = {"ngram": {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": config.prompt_lookup_max},
             f"draft-{len(keep)}L": {"method": "draft_model", "model": draft_model, "num_speculative_tokens": k}}
    rec = Record("speculative", env=env.describe())
    for workload, ids in tqdm(prompts.items(), desc="speculative: workloads", disable=not progress):
        rows, outs = _time(target, draft, ids, specs, config, device)
        plain = outs["greedy"][0]  # the untimed warm-up call: every later call of every variant must give these
        for name, row in rows.items():
            runs = outs[name]
            tokens = [r if isinstance(r, list) else r.tokens for r in runs]
            extra = {}
            if name != "greedy":
                extra = {"acceptance_rate": runs[-1].acceptance_rate, "tokens_per_round": runs[-1].tokens_per_round,
                         "rounds": runs[-1].rounds}
            rec.add(f"{workload}/{name}", model=config.model, workload=workload, prompt_tokens=len(ids),
                    dtype=env.dtype_name(measure.compute_dtype(model)),
                    tokens_per_s=config.new_tokens / (row["latency_ms_median"] / 1e3),
                    tokens_per_s_min=config.new_tokens / (row["latency_ms_max"] / 1e3),
                    tokens_per_s_max=config.new_tokens / (row["latency_ms_min"] / 1e3),
                    latency_ms_median=row["latency_ms_median"], latency_ms_iqr=row["latency_ms_iqr"],
                    latency_ms_min=row["latency_ms_min"], latency_ms_max=row["latency_ms_max"],
                    speedup_vs_baseline=row["speedup_vs_baseline"],
                    matches_greedy=all(t == plain for t in tokens), **extra)
    rec.config = {**asdict(config), "device": str(device), "torch_threads": torch.get_num_threads(),
                  "draft_layers": keep, "draft_trained": False,
                  "measurement": "per workload: one untimed call per variant (compare_latency's warm-up), then "
                                 f"{config.repeats} rotated rounds; median, IQR, min, max of the whole generation "
                                 "(prefill included); speedup = ratio of medians vs greedy in the same loop; "
                                 "acceptance from the last run (deterministic: greedy)"}
    rec.config["targets"] = check(rec, TARGETS)
    return rec


def _time(target: StaticDecoder, draft: StaticDecoder, ids: list[int], specs: dict[str, dict], config: Config,
          device: torch.device) -> tuple[dict[str, dict], dict[str, list]]:
    """Greedy and every speculative config on one prompt, rotated repeats; each call's output kept for checking."""
    outs: dict[str, list] = {}

    def greedy() -> None:
        outs.setdefault("greedy", []).append(
            target.generate(torch.tensor([ids], device=device), config.new_tokens)[0].tolist())

    def spec(name: str, cfg: dict):
        def go() -> None:
            outs.setdefault(name, []).append(generate(target, ids, config.new_tokens, cfg,
                                                      draft=draft if cfg["method"] == "draft_model" else None))
        return go

    k = config.num_speculative_tokens
    fns = {"greedy": greedy, **{f"{name}-k{k}": spec(f"{name}-k{k}", cfg) for name, cfg in specs.items()}}
    return measure.compare_latency(fns, repeats=config.repeats, device=device, baseline="greedy"), outs


TARGETS = [
    Target("every speculative variant gives greedy's tokens exactly (share of rows)",
           lambda r: sum(bool(v["matches_greedy"]) for v in r.variants) / len(r.variants), 1.0),
    Target("n-gram lookup where the output copies the prompt: speed-up over greedy",
           lambda r: r.variant("copy/ngram-k{num_speculative_tokens}".format_map(r.config))["speedup_vs_baseline"],
           1.5),
    Target("n-gram lookup on free text costs at most 15% (speed-up over greedy)",
           lambda r: r.variant("free/ngram-k{num_speculative_tokens}".format_map(r.config))["speedup_vs_baseline"],
           0.85),
]


def figures(rec: Record) -> list:
    """Decode tokens/s of each variant on each workload."""
    from labkit.viz.plots import metric_bars

    return [metric_bars(rec, "tokens_per_s", title="speculative decoding: tokens/s at batch 1 (median, min–max)")]
