"""Per-response layer means of hidden states, where extraction, analysis and screening get
them: captured during generation (a generation job's activation file, ``activations_dir``),
or by a batched forward pass over the stored prompt and answer ids (``ForwardMeans``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from db import PersonaError, Store
from db.store import Response
from pipeline.runners import (
    additive_masks,
    attention_windows,
    fused_forward_runner,
    padded_causal,
)
from vectors import activations

# activation kind (per response) -> vector kind (per trait)
MEAN_TO_VECTOR = {
    "response_avg": "response_avg_diff",
    "prompt_avg": "prompt_avg_diff",
    "prompt_last": "prompt_last_diff",
}
TOKENS_PER_BATCH = 16384


def activations_dir(store: Store, job_id: int) -> Path:
    """Where a generation job keeps the means it captured (shards, then one consolidated file)."""
    return store.data_dir / "activations" / f"job-{job_id}"


# ---- the forward path --------------------------------------------------------------------------
class ForwardMeans:
    """Per-response layer means by a batched forward pass, reduced inside the batch."""

    def __init__(self, loaded: Any, *, padding: str = "right", final_norm: bool = False) -> None:
        if padding not in ("left", "right"):
            raise ValueError("padding must be left or right")
        self.loaded = loaded
        self.padding = padding
        # Also each kind's mean of the last block's output after the final norm (HF's
        # ``hidden_states[L]``, the original project's row L), as KIND + "_final" [B, d].
        self.final_norm = final_norm
        model = loaded.model
        self.base = getattr(model, model.base_model_prefix, model)  # no LM head: no logits
        self.layers = list(self.base.layers)
        self.pad_id = int(loaded.tokenizer.pad_token_id)
        self._runner = fused_forward_runner(model)
        # Only our own masks need the windows; the model's own forward builds its masks.
        self._windows = attention_windows(model) if self._runner is not None else {}

    @torch.inference_mode()
    def batch_means(
        self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> dict[str, torch.Tensor]:
        """kind -> [B, L+1, d] float32 on the device, for (prompt ids, answer ids) rows."""
        device = self.loaded.device
        lengths = [len(p) + len(a) for p, a in rows]
        width = max(lengths)
        b = len(rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.bool)
        prompt = torch.zeros((b, width), dtype=torch.bool)
        answer = torch.zeros((b, width), dtype=torch.bool)
        last = torch.zeros(b, dtype=torch.long)
        for row, (p, a) in enumerate(rows):
            start = 0 if self.padding == "right" else width - len(p) - len(a)
            ids[row, start : start + len(p) + len(a)] = torch.tensor([*p, *a], dtype=torch.long)
            mask[row, start : start + len(p) + len(a)] = True
            prompt[row, start : start + len(p)] = True
            answer[row, start + len(p) : start + len(p) + len(a)] = True
            last[row] = start + len(p) - 1
        ids, mask, prompt, answer, last = (t.to(device) for t in (ids, mask, prompt, answer, last))
        positions = (mask.long().cumsum(1) - 1).clamp_(min=0)
        n_states = len(self.layers) + 1
        hidden = int(self.loaded.model.config.hidden_size)
        out = {k: torch.zeros(b, n_states, hidden, device=device) for k in MEAN_TO_VECTOR}
        # Averaging weights [B, 2, T]: one batched product per layer gives both means.
        weights = torch.stack(
            [
                prompt / prompt.sum(1, keepdim=True).clamp(min=1),
                answer / answer.sum(1, keepdim=True).clamp(min=1),
            ],
            dim=1,
        ).float()
        rows_index = torch.arange(b, device=device)

        def reduce(index: int, h: torch.Tensor) -> None:
            means = torch.bmm(weights, h.float())
            out["prompt_avg"][:, index] = means[:, 0]
            out["response_avg"][:, index] = means[:, 1]
            out["prompt_last"][:, index] = h[rows_index, last].float()
            if self.final_norm and index == len(self.layers):
                normed = self.base.norm(h).float()
                means = torch.bmm(weights, normed)
                out["prompt_avg_final"] = means[:, 0]
                out["response_avg_final"] = means[:, 1]
                out["prompt_last_final"] = normed[rows_index, last]

        def hook_for(index: int):
            def hook(_module: Any, _inputs: Any, output: Any) -> None:
                reduce(index, output[0] if isinstance(output, tuple) else output)

            return hook

        handles = [self.base.embed_tokens.register_forward_hook(hook_for(0))]
        handles += [
            layer.register_forward_hook(hook_for(i + 1)) for i, layer in enumerate(self.layers)
        ]
        try:
            if self._runner is None:
                self.base(
                    input_ids=ids,
                    attention_mask=mask.long(),
                    position_ids=positions,
                    use_cache=False,
                )
            else:
                # The static runner's fused norms, projections, rotary kernel and attention
                # (docs/benchmarks.md, "Session 17"), with our own masks: causal over each
                # row's tokens, a pad query seeing only itself (never an all-masked row).
                masks = additive_masks(
                    padded_causal(mask)[:, None],
                    positions,
                    positions,
                    self._windows,
                    self._runner.dtype,
                )
                with self._runner.attention():
                    self.base(
                        input_ids=ids, attention_mask=masks, position_ids=positions, use_cache=False
                    )
        finally:
            for handle in handles:
                handle.remove()
        return out

    def iter_means(
        self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], tokens_per_batch: int
    ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(row indices, means) over length-sorted batches; a CUDA out-of-memory halves the
        batch and the step goes on."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
        start = 0
        budget = tokens_per_batch
        while start < len(order):
            width = 0
            end = start
            while end < len(order):
                longest = max(width, len(rows[order[end]][0]) + len(rows[order[end]][1]))
                if end > start and longest * (end - start + 1) > budget:
                    break
                width = longest
                end += 1
            chunk = order[start:end]
            try:
                means = self.batch_means([rows[i] for i in chunk])
            except torch.cuda.OutOfMemoryError:
                if len(chunk) == 1:
                    raise PersonaError(
                        "CUDA out of memory on a single response in the forward pass; use a "
                        "GPU with more memory or a smaller model"
                    ) from None
                torch.cuda.empty_cache()
                budget = max(1, budget // 2)
                continue
            yield chunk, means
            start = end


# ---- means for a set of responses -------------------------------------------------------------
def captured_means(
    store: Store, responses: Sequence[Response]
) -> dict[int, dict[str, torch.Tensor]] | None:
    """Per-response captured means (CPU), or None when any response lacks them."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for job_id in sorted({r.job for r in responses}):
        path = activations_dir(store, job_id) / activations.CONSOLIDATED
        if not path.exists():
            return None
        try:
            tensors = activations.load_consolidated(path)
        except activations.ActivationFileError as exc:  # never used; say how to rebuild it
            raise PersonaError(
                f"{exc}; run `persona worker {job_id}` to rebuild it from the stored tokens, "
                "or extract with --source forward"
            ) from None
        index = {rid: row for row, rid in enumerate(tensors["response_ids"].tolist())}
        for r in responses:
            if r.job == job_id:
                if r.id not in index:
                    return None
                found[r.id] = {k: tensors[k][index[r.id]] for k in MEAN_TO_VECTOR}
    return found
