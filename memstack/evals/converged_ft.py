"""Full fine-tuning per user, the converged suite's heaviest baseline (evals/converged.py).

Each user gets the whole backbone fine-tuned on their facts: a private copy of the plain served
backbone (every parameter trainable: embeddings, attention, MLPs, norms, the tied head), `steps`
Adam updates of next-token loss per mention on the same texts as every other approach (a fresh
optimizer per learn call, as a server's learn call is: the user's state is their weights only).
What a server would keep per user is stored for real: the parameter tensors that changed, as a
safetensors file, and **bytes per user is that file's payload** (the changed tensors' bytes; with
Adam and a tied head practically every tensor changes, so this is the whole model).

Users are independent (each has their own weights; nothing is shared after the copy), so the
pass runs user by user -- one copy and one optimizer in memory, not one per user: reset to the
base weights, learn mention 1, measure recall, learn the rest, measure, store, move on. The
stream's interleaving of users cannot change any user's result here.

The differential leakage test for this approach: a user's logits from their stored weights, read
again after every later user has been trained, minus the same logits measured right after their
own training (max |diff|; must be exactly 0: other users' updates touch other copies).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from memstack.memory.base import Step


class FullFineTune:
    """One trainable copy of `plain`; `reset` / `learn` / `save` / `load` one user at a time."""

    def __init__(self, plain: torch.nn.Module, lr: float, steps: int, root: Path):
        self.base = plain
        self.model = copy.deepcopy(plain).eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.lr, self.steps = lr, steps
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.loaded: str | None = None             # whose weights the copy holds (None: the base's)

    def _pairs(self):
        base = dict(self.base.named_parameters())
        return [(n, p, base[n]) for n, p in self.model.named_parameters()]

    @torch.no_grad()
    def reset(self) -> None:
        for _, p, b in self._pairs():
            p.copy_(b)
        self.loaded = None

    def learn(self, name: str, texts: list[list[int]]) -> float:
        """`steps` Adam updates of every parameter on `texts` (user `name`'s copy); the last loss."""
        from memstack.engine.user_memory import batch_of

        if self.loaded != name:
            self.load(name)
        opt = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        x, y = batch_of(texts)                                             # (B, T) each
        loss = torch.tensor(0.0)
        for _ in range(self.steps):
            lg = self.model(x, None, Step())[0].logits                     # (B, T, V)
            loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), y.reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        del opt                                                            # its state is 2x the model
        self.loaded = name
        return float(loss.detach())

    def path(self, name: str) -> Path:
        return self.root / f"{name}.safetensors"

    @torch.no_grad()
    def save(self, name: str) -> int:
        """Store the tensors of the copy that differ from the base; returns their bytes."""
        from safetensors.torch import save_file

        changed = {n: p.detach().contiguous().clone() for n, p, b in self._pairs() if not torch.equal(p, b)}
        save_file(changed, str(self.path(name)), metadata={"user": name, "lr": repr(self.lr)})
        return sum(t.numel() * t.element_size() for t in changed.values())

    @torch.no_grad()
    def load(self, name: str) -> float:
        """The base weights with user `name`'s stored tensors (none stored: the base); seconds taken."""
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        self.reset()
        if self.path(name).exists():
            params = dict(self.model.named_parameters())
            for n, t in load_file(str(self.path(name))).items():
                params[n].copy_(t)
        self.loaded = name
        return time.perf_counter() - t0

    def drop(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    @torch.no_grad()
    def logits(self, name: str, ids: list[int]) -> Tensor:
        """(T, V) of user `name`'s weights (loaded from their stored tensors when not in the copy)."""
        if self.loaded != name:
            self.load(name)
        return self.model(torch.tensor([ids]), None, Step())[0].logits[0].float()


def full_ft_pass(h, users: list[int], mentions: int, known: list[tuple[str, str]], lr: float, steps: int,
                 root: Path, say=lambda *a: None) -> dict:
    """Full fine-tuning per user on harness `h`'s stream, user by user; the suite's metrics.

    Leakage pairs as the rest of the suite: user B = the next user (cyclic among `users`) is asked
    user A's facts, here measured when B's weights are in the copy."""
    ft = FullFineTune(h.plain, lr, steps, root)
    h.ft = ft
    hits1, hitsM, leak, bpb, known_hits, nbytes, learn_s, swap_s, diffs = [], [], [], [], [], [], [], [], []
    prev: tuple[str, list[int], Tensor] | None = None
    for i, u in enumerate(users):
        name = f"u{u}"
        ft.reset()
        texts = [[h.eot] + h.tok.encode(f.text) for f in h.users[u]]
        for m in range(1, mentions + 1):
            t0 = time.perf_counter()
            ft.learn(name, texts)
            learn_s.append(time.perf_counter() - t0)
            if m in (1, mentions):
                got = [h.recalled("full_ft", u, f.cue, f.answer) for f in h.users[u]]
                (hits1 if m == 1 else hitsM).extend(got)
                if m == 1 and mentions == 1:
                    hitsM.extend(got)
        a = users[(i - 1) % len(users)]                           # this user (B) asked A's facts
        if len(users) > 1:
            leak.extend(h.recalled("full_ft", u, f.cue, f.answer) for f in h.users[a])
        bpb.append(h.bpb("full_ft", u))
        known_hits.extend(h.recalled("full_ft", u, c, k) for c, k in known)
        nbytes.append(ft.save(name))
        probe = [h.eot] + h.tok.encode(h.users[u][0].cue)
        mine = ft.logits(name, probe)
        if prev is not None:                                      # the previous user, after this one learned
            pname, pprobe, plogits = prev
            swap_s.append(ft.load(pname))
            diffs.append(float((ft.logits(pname, pprobe) - plogits).abs().max()))
            ft.drop(pname)
        prev = (name, probe, mine)
        say(f"  full_ft: user {i + 1}/{len(users)} done")
    if prev is not None:
        ft.drop(prev[0])
    h.ft = None
    mean = lambda xs: sum(xs) / len(xs) if xs else None            # noqa: E731
    return {"hits@1": hits1, f"hits@{mentions}": hitsM, "leak_hits": leak, "bpb": mean(bpb),
            "known_acc": mean(known_hits), "bytes_per_user": mean(nbytes), "update_s": mean(learn_s),
            "swap_s": mean(swap_s), "differential_max_abs": max(diffs) if diffs else None, "users": len(users)}


__all__ = ["FullFineTune", "full_ft_pass"]
