"""What SWAN and SinkGD share: matrix-rule groups go to the subclass's ``_matrix_update`` on matrix
fragments; fallback groups (embeddings, LM head, 0-/1-D) take AdamW or the stateless row-wise rule
at ``lr * fallback_lr_ratio`` (applied here, so a scheduler writing one LR into every group keeps the
ratio)."""

from __future__ import annotations

from .base import StatelessOptimizer
from .fallback import adamw_fallback, adamw_state, stateless_fallback
from .fragments import MatrixFragment, split_matrices


class MatrixRuleOptimizer(StatelessOptimizer):
    uses_rules = True

    def _ensure_state(self, group, units, shards) -> None:
        if group["rule"] == "fallback" and group["fallback"] == "adamw":
            for t in units:
                adamw_state(self.state[t], t)

    def _step_group(self, group, units, live) -> None:
        shards = [s for _, ss in units for s in ss]
        comm = self._comm(shards[0])
        if any(self._comm(s) is not comm for s in shards):
            raise RuntimeError("all weights of one param group must be sharded over the same process group")
        if group["rule"] == "fallback":
            lr = group["lr"] * group["fallback_lr_ratio"]
            if group["fallback"] == "adamw":
                adamw_fallback(self, group, [u for u, _ in units], lr)
            else:
                stateless_fallback(self, group, shards, comm, lr)
            return
        frags = [f for s in shards for f in split_matrices(s, group.get("batch_dims", 0))]
        # One global order on every rank: same shapes together (batching), then by position.
        frags.sort(key=lambda f: (f.m, f.n, f.key))
        self._matrix_update(group, frags, comm, group["lr"])

    def _matrix_update(self, group: dict, frags: list[MatrixFragment], comm, lr: float) -> None:
        raise NotImplementedError

    def _apply_fragments(self, group: dict, frags: list[MatrixFragment], updates, lr: float) -> None:
        self._apply([f.param for f in frags], list(updates), lr, group["weight_decay"], group)
