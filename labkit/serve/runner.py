"""Model runner: turns the scheduler's decision into a flattened :class:`~labkit.serve.model.Batch`, runs the
model, and samples one token for every sequence whose known tokens now all have KV — or, for a sequence that
brought guesses (speculative decoding), verifies them and returns the kept ones and the token after them."""

from __future__ import annotations

import time

import torch

from labkit.serve.block_manager import BlockManager
from labkit.serve.kv_cache import KVCache
from labkit.serve.model import Batch, PagedLlama
from labkit.serve.sampling import SamplingParams, sample_batch, verify_batch
from labkit.serve.sequence import Sequence


class ModelRunner:
    def __init__(self, model: PagedLlama, kv: KVCache, block_manager: BlockManager, decode_group: int = 8) -> None:
        self.model, self.kv, self.bm = model, kv, block_manager
        self.device = model.device
        self.decode_group = decode_group  # decode sequences attended together (EngineConfig.decode_group)

    def prepare(self, scheduled: list[tuple[Sequence, int]], drafts: dict[int, list[int]] | None = None
                ) -> tuple[Batch, list[Sequence]]:
        """The flat batch, and the sequences it samples for, in the order of their logits rows (a sequence with
        ``k`` drafts has ``k + 1`` rows: the target's next-token logits after each of its guesses)."""
        drafts = drafts or {}
        ids, pos, slots, prefills, dec_rows, dec_ctx, logit_rows, sampled = [], [], [], [], [], [], [], []
        for seq, n in scheduled:
            c = seq.num_computed_tokens
            row = len(ids)
            guess = drafts.get(seq.seq_id, [])
            ids += seq.token_ids[c:c + n - len(guess)] + guess
            pos += range(c, c + n)
            slots += [self.bm.slot(seq, p) for p in range(c, c + n)]
            blocks = seq.block_table[:-(-(c + n) // self.bm.block_size)]
            if (n == 1 or guess) and c > 0:  # a decode: its token, and any guesses after it, attend together
                dec_rows.append(list(range(row, row + n)))
                dec_ctx.append((blocks, c + n))
            else:
                prefills.append((row, n, torch.tensor(blocks, device=self.device), c))
            if guess:
                logit_rows += range(row, row + n)
                sampled.append(seq)
            elif c + n == len(seq):
                logit_rows.append(row + n - 1)
                sampled.append(seq)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        order = sorted(range(len(dec_rows)), key=lambda i: (len(dec_rows[i]), dec_ctx[i][1]))
        decodes = [self._decode_group([dec_rows[i] for i in g], [dec_ctx[i] for i in g])
                   for g in (order[k:k + self.decode_group] for k in range(0, len(order), self.decode_group))]
        batch = Batch(input_ids=t(ids), positions=t(pos), slot_mapping=t(slots), prefills=prefills,
                      decodes=decodes, logits_rows=t(logit_rows))
        return batch, sampled

    def _decode_group(self, rows: list[list[int]], ctx: list[tuple[list[int], int]]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batched attention call for decodes of similar length. A sequence verifying ``k`` guesses has
        ``k + 1`` query rows, each seeing the context up to itself; shorter sequences repeat their last row (the
        same query and mask, so the repeated write is the same value)."""
        nb_max, n_max = max(len(b) for b, _ in ctx), max(map(len, rows))
        blocks = torch.zeros(len(ctx), nb_max, dtype=torch.long)
        mask = torch.zeros(len(ctx), n_max, nb_max * self.bm.block_size, dtype=torch.bool)
        for i, (b, length) in enumerate(ctx):
            blocks[i, :len(b)] = torch.tensor(b)
            for j in range(n_max):
                mask[i, j, :length - len(rows[i]) + 1 + min(j, len(rows[i]) - 1)] = True
        padded = [r + [r[-1]] * (n_max - len(r)) for r in rows]
        return torch.tensor(padded, device=self.device), blocks.to(self.device), mask.to(self.device)

    def run(self, scheduled: list[tuple[Sequence, int]], params: dict[int, SamplingParams],
            generators: dict[int, torch.Generator | None], copies: list[tuple[int, int]] = (),
            drafts: dict[int, list[int]] | None = None, phase_s: dict[str, float] | None = None
            ) -> dict[int, list[int]]:
        """One step: copy-on-write copies, forward, sampling. Returns ``{seq_id: new tokens}``: one token, or with
        drafts the kept guesses and the target's token after them. ``phase_s`` gains the seconds of "prepare"
        (copies and the batch), "forward" and "sample"."""
        phase_s = {} if phase_s is None else phase_s
        t0 = time.perf_counter()
        for src, dst in copies:
            self.kv.copy_block(src, dst)
        batch, sampled = self.prepare(scheduled, drafts)
        t1 = time.perf_counter()
        logits = self.model(batch, self.kv)
        t2 = time.perf_counter()
        sp, gens = [params[s.seq_id] for s in sampled], [generators.get(s.seq_id) for s in sampled]
        if not drafts:
            new = {s.seq_id: [t] for s, t in zip(sampled, sample_batch(logits, sp, gens))}
        else:
            guesses = [drafts.get(s.seq_id, []) for s in sampled]
            new = {s.seq_id: t for s, t in zip(sampled, verify_batch(logits, guesses, sp, gens))}
        for key, dt in (("prepare", t1 - t0), ("forward", t2 - t1), ("sample", time.perf_counter() - t2)):
            phase_s[key] = phase_s.get(key, 0.0) + dt
        return new
