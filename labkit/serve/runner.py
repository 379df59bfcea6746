"""Model runner: turns the scheduler's decision into a flattened :class:`~labkit.serve.model.Batch`, runs the
model, and samples one token for every sequence whose known tokens now all have KV."""

from __future__ import annotations

import torch

from labkit.serve.block_manager import BlockManager
from labkit.serve.kv_cache import KVCache
from labkit.serve.model import Batch, PagedLlama
from labkit.serve.sampling import SamplingParams, sample_batch
from labkit.serve.sequence import Sequence


class ModelRunner:
    def __init__(self, model: PagedLlama, kv: KVCache, block_manager: BlockManager, decode_group: int = 8) -> None:
        self.model, self.kv, self.bm = model, kv, block_manager
        self.device = model.device
        self.decode_group = decode_group  # decode sequences attended together (EngineConfig.decode_group)

    def prepare(self, scheduled: list[tuple[Sequence, int]]) -> tuple[Batch, list[Sequence]]:
        ids, pos, slots, prefills, dec_rows, dec_ctx, logit_rows, sampled = [], [], [], [], [], [], [], []
        for seq, n in scheduled:
            c = seq.num_computed_tokens
            row = len(ids)
            ids += seq.token_ids[c:c + n]
            pos += range(c, c + n)
            slots += [self.bm.slot(seq, p) for p in range(c, c + n)]
            blocks = seq.block_table[:-(-(c + n) // self.bm.block_size)]
            if n == 1 and c > 0:
                dec_rows.append(row)
                dec_ctx.append((blocks, c + 1))
            else:
                prefills.append((row, n, torch.tensor(blocks, device=self.device), c))
            if c + n == len(seq):
                logit_rows.append(row + n - 1)
                sampled.append(seq)
        t = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        order = sorted(range(len(dec_rows)), key=lambda i: dec_ctx[i][1])
        decodes = [self._decode_group([dec_rows[i] for i in g], [dec_ctx[i] for i in g])
                   for g in (order[k:k + self.decode_group] for k in range(0, len(order), self.decode_group))]
        batch = Batch(input_ids=t(ids), positions=t(pos), slot_mapping=t(slots), prefills=prefills,
                      decodes=decodes, logits_rows=t(logit_rows))
        return batch, sampled

    def _decode_group(self, rows: list[int], ctx: list[tuple[list[int], int]]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        nb_max = max(len(b) for b, _ in ctx)
        blocks = torch.zeros(len(ctx), nb_max, dtype=torch.long)
        mask = torch.zeros(len(ctx), nb_max * self.bm.block_size, dtype=torch.bool)
        for i, (b, length) in enumerate(ctx):
            blocks[i, :len(b)] = torch.tensor(b)
            mask[i, :length] = True
        return torch.tensor(rows, device=self.device), blocks.to(self.device), mask.to(self.device)

    def run(self, scheduled: list[tuple[Sequence, int]], params: dict[int, SamplingParams],
            generators: dict[int, torch.Generator | None], copies: list[tuple[int, int]] = ()) -> dict[int, int]:
        """One step: copy-on-write copies, forward, sampling. Returns ``{seq_id: new token}``."""
        for src, dst in copies:
            self.kv.copy_block(src, dst)
        batch, sampled = self.prepare(scheduled)
        logits = self.model(batch, self.kv)
        tokens = sample_batch(logits, [params[s.seq_id] for s in sampled],
                              [generators.get(s.seq_id) for s in sampled])
        return {s.seq_id: t for s, t in zip(sampled, tokens)}
