"""LoRA per user, the converged suite's parameter-efficient fine-tuning baseline (evals/converged.py).

The same frozen backbone exported to a Hugging Face LlamaForCausalLM (`hf.convert.to_hf`: bit for
bit the same weights), one `peft` LoRA adapter per user (rank `r` on the attention q/v
projections of every layer, the usual recipe), trained with Adam on that user's facts at each
mention -- the same texts and number of updates per mention as the user tables. A user's request
runs with its own adapter active (`set_adapter`); the base model is the adapters disabled.

The learning rate is chosen on validation users (`lora_lr_grid`, evals/converged_select.py); the
optimizer's state is kept per user across that user's learn calls. Deviations: adapters are not merged for serving (served latency is not measured for them:
they do not run in memstack's engine).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class LoRAUsers:
    def __init__(self, plain_model, r: int = 8, lr: float = 1e-3, steps: int = 5):
        from memstack.hf.convert import to_hf

        self.hf = to_hf(plain_model)
        for p in self.hf.parameters():
            p.requires_grad_(False)
        self.r, self.lr, self.steps = r, lr, steps
        self.peft = None
        self.opts: dict[str, torch.optim.Optimizer] = {}

    def _adapter(self, name: str):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=self.r, lora_alpha=2 * self.r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        if self.peft is None:
            self.peft = get_peft_model(self.hf, cfg, adapter_name=name)
        elif name not in self.peft.peft_config:
            self.peft.add_adapter(name, cfg)
        self.peft.set_adapter(name)
        if name not in self.opts:
            params = [p for n, p in self.peft.named_parameters() if f".{name}." in n and "lora_" in n]
            for p in params:
                p.requires_grad_(True)
            self.opts[name] = torch.optim.Adam(params, lr=self.lr)
        return self.opts[name]

    def learn(self, name: str, texts: list[list[int]]) -> float:
        """`steps` Adam steps on next-token loss over `texts` with the user's adapter; last loss."""
        from memstack.engine.user_memory import batch_of

        opt = self._adapter(name)
        self.peft.train()
        x, y = batch_of(texts)
        loss = torch.tensor(0.0)
        for _ in range(self.steps):
            logits = self.peft(input_ids=x).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.peft.eval()
        return float(loss.detach())

    @torch.no_grad()
    def logits(self, name: str | None, ids: list[int]) -> Tensor:
        """(T, V) with user `name`'s adapter (None or unknown: the base model)."""
        x = torch.tensor([ids])
        if self.peft is None:
            return self.hf(input_ids=x).logits[0].float()
        if name is None or name not in self.peft.peft_config:
            with self.peft.disable_adapter():
                return self.peft(input_ids=x).logits[0].float()
        self.peft.set_adapter(name)
        return self.peft(input_ids=x).logits[0].float()

    def nbytes(self, name: str) -> int:
        if self.peft is None or name not in self.peft.peft_config:
            return 0
        return sum(p.numel() * p.element_size() for n, p in self.peft.named_parameters() if f".{name}." in n and "lora_" in n)


__all__ = ["LoRAUsers"]
