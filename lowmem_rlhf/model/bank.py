"""AdapterBank: many LoRA roles (policy, reference, reward, value) on ONE frozen backbone.

This module is the only code that calls peft's `set_adapter` / `disable_adapter`. peft's
`set_adapter` also flips `requires_grad` (activating "reward" makes reward trainable and freezes
policy, pitfall 2), so the bank keeps its own record of which roles train and re-applies it after
every peft call; `use()` restores every flag and every module's train/eval mode on exit, also when
the body raises.

    bank = AdapterBank(model)
    bank.add_role("policy", lora=lora_cfg, trainable=True)
    bank.add_role("reference", copy_of="policy")          # frozen copy
    optimizer = torch.optim.AdamW(bank.trainable_parameters())
    with bank.use("policy", train=True) as m:
        loss = ...
"""

from __future__ import annotations

import contextlib
import copy
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowmem_rlhf.errors import UserError
from lowmem_rlhf.model.heads import HEAD_FILE, ScalarHead, check_finite
from lowmem_rlhf.model.peft_4bit import use_lean_4bit_lora

_ROLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class Role:
    name: str
    trainable: bool
    head: ScalarHead | None = None


class AdapterBank:
    """Named LoRA roles over one frozen (usually 4-bit) causal LM."""

    def __init__(self, model: nn.Module, gradient_checkpointing: bool = True):
        self.base_model = model
        self.peft_model = None
        self.roles: dict[str, Role] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            # Non-reentrant checkpointing needs no `enable_input_require_grads` hack and works with a
            # frozen embedding; it only acts in train mode, so generation keeps its KV cache (pitfall 9).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ------------------------------------------------------------------ building roles

    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.base_model.config.get_text_config().hidden_size

    def add_role(
        self,
        name: str,
        lora=None,
        *,
        from_dir: str | Path | None = None,
        copy_of: str | None = None,
        trainable: bool = False,
        head: bool = False,
        fresh_head: bool = False,
    ) -> Role:
        """Register a role from a peft LoraConfig (fresh), a saved adapter folder, or a copy of a role.

        head=True gives the role an fp32 scalar head: loaded from `from_dir` (an error if missing),
        copied from `copy_of`'s head (an error if it has none), or freshly initialised for a new
        adapter. fresh_head=True starts a new head on a loaded or copied adapter (a reward model
        initialised from the SFT adapter).
        """
        from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        if not _ROLE_NAME.match(name):
            raise ValueError(f"role name {name!r} must be a Python identifier")
        if name in self.roles:
            raise ValueError(f"role {name!r} already exists")
        if sum(x is not None for x in (lora, from_dir, copy_of)) != 1:
            raise ValueError("give exactly one of lora=, from_dir= or copy_of=")

        if copy_of is not None:
            self._role(copy_of)
            lora = copy.deepcopy(self.peft_model.peft_config[copy_of])
            lora.inference_mode = False
        if from_dir is not None:
            from_dir = Path(from_dir)
            if not (from_dir / "adapter_config.json").is_file():
                raise UserError(f"{from_dir} holds no PEFT adapter (adapter_config.json is missing); check the path")
            if self.peft_model is None:
                self.peft_model = PeftModel.from_pretrained(
                    self.base_model, str(from_dir), adapter_name=name, is_trainable=trainable
                )
            else:
                self.peft_model.load_adapter(str(from_dir), adapter_name=name, is_trainable=trainable)
        elif self.peft_model is None:
            self.peft_model = get_peft_model(self.base_model, lora, adapter_name=name)
        else:
            self.peft_model.add_adapter(name, lora)
        use_lean_4bit_lora(self.peft_model)  # LoRA in the compute dtype, no copy of the 4-bit output

        if copy_of is not None:
            state = get_peft_model_state_dict(self.peft_model, adapter_name=copy_of)
            set_peft_model_state_dict(self.peft_model, state, adapter_name=name)

        role = Role(name, trainable)
        if head:
            if fresh_head or (lora is not None and copy_of is None):
                role.head = ScalarHead(self.hidden_size).to(self.device)
            elif from_dir is not None:
                role.head = ScalarHead.load(from_dir, self.device)
            else:
                source = self.head(copy_of)
                role.head = ScalarHead(self.hidden_size, offset=source.offset).to(self.device)
                role.head.load_state_dict(source.state_dict())
        self.roles[name] = role
        # Keep the adapter that was active before (peft activates the first one it creates).
        self.peft_model.set_adapter(next(iter(self.roles)))
        self._apply_flags()
        return role

    def _role(self, name: str) -> Role:
        if name not in self.roles:
            raise KeyError(f"no role {name!r}; roles are {sorted(self.roles)}")
        return self.roles[name]

    # ------------------------------------------------------------------ parameters

    def role_parameters(self, name: str) -> list[nn.Parameter]:
        """The LoRA parameters of one role (plus its head), in a stable order."""
        role = self._role(name)
        marker = f".{name}."
        params = [p for n, p in self.peft_model.named_parameters() if "lora_" in n and marker in f"{n}."]
        if role.head is not None:
            params.extend(role.head.parameters())
        return params

    def named_role_parameters(self, name: str) -> dict[str, nn.Parameter]:
        marker = f".{name}."
        out = {n: p for n, p in self.peft_model.named_parameters() if "lora_" in n and marker in f"{n}."}
        role = self._role(name)
        if role.head is not None:
            out.update({f"head.{n}": p for n, p in role.head.named_parameters()})
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Explicit list for the optimizer: trainable roles only, never the base or frozen roles."""
        return [p for name, role in self.roles.items() if role.trainable for p in self.role_parameters(name)]

    def _apply_flags(self) -> None:
        """Set requires_grad from the bank's record, undoing whatever peft flipped."""
        for p in self.peft_model.parameters():
            p.requires_grad_(False)
        for name, role in self.roles.items():
            for p in self.role_parameters(name):
                p.requires_grad_(role.trainable)

    # ------------------------------------------------------------------ switching

    @contextlib.contextmanager
    def use(self, role: str | None, train: bool = False) -> Iterator[nn.Module]:
        """Run the body with `role`'s adapter active (None = adapters disabled, the raw base).

        train=True puts the model in train mode (dropout, gradient checkpointing); the default is
        eval mode, which rollout and scoring need (pitfall 6). Every requires_grad flag, the active
        adapter and every module's train/eval mode are restored on exit, even if the body raises.
        """
        model = self.peft_model
        if role is not None:
            self._role(role)
        saved_flags = [(p, p.requires_grad) for p in model.parameters()]
        saved_modes = [(m, m.training) for m in model.modules()]
        saved_active = model.active_adapter
        with contextlib.ExitStack() as stack:
            try:
                if role is None:
                    stack.enter_context(model.disable_adapter())
                else:
                    model.set_adapter(role)
                self._apply_flags()
                model.train(train)
                yield model
            finally:
                stack.close()
                model.set_adapter(saved_active)
                for p, flag in saved_flags:
                    p.requires_grad_(flag)
                for m, mode in saved_modes:
                    m.training = mode

    def disable_dropout(self) -> None:
        """Set every dropout (LoRA's included) to p=0, so train-mode and eval-mode passes agree exactly.

        RL and DPO need it (TRL does the same): the policy's log-probs during an update must equal
        the ones measured at rollout / against the reference when the weights are the same.
        """
        for m in self.peft_model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0

    def head(self, name: str) -> ScalarHead:
        head = self._role(name).head
        if head is None:
            raise KeyError(f"role {name!r} has no scalar head")
        return head

    # ------------------------------------------------------------------ saving and loading

    def save_role(self, name: str, directory: str | Path) -> Path:
        """Save one role in standard PEFT layout (+ head.safetensors) into `directory`.

        Files are written to a temporary folder and moved in one by one, so an interrupted save never
        leaves a half-written adapter behind; weights holding NaN or inf are refused (a UserError).
        `PeftModel.from_pretrained(base, directory)` loads it.
        """
        role = self._role(name)
        directory = Path(directory)
        # Before anything is written: a diverged (NaN/inf) adapter or head never replaces a result.
        check_finite(self.state_dict(name), f"role {name!r} to {directory}")
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".tmp-save-") as tmp:
            self.peft_model.save_pretrained(tmp, selected_adapters=[name])
            src = Path(tmp) / name if (Path(tmp) / name / "adapter_config.json").is_file() else Path(tmp)
            if role.head is not None:
                role.head.save(src)
            elif (directory / HEAD_FILE).exists():
                (directory / HEAD_FILE).unlink()
            for f in src.iterdir():
                if f.is_file():
                    shutil.move(str(f), str(directory / f.name))
        return directory

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The role's weights (LoRA + head) as CPU tensors, keyed by parameter name."""
        return {n: p.detach().cpu().clone() for n, p in self.named_role_parameters(name).items()}

    @torch.no_grad()
    def load_state_dict(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Load weights produced by `state_dict(name)` (used by checkpoints); names must match exactly."""
        params = self.named_role_parameters(name)
        if set(params) != set(state):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(f"role {name!r} state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        for n, p in params.items():
            p.copy_(state[n].to(p.device, p.dtype))


def lora_config(cfg, task_type: str = "CAUSAL_LM"):
    """peft LoraConfig from the recipe's `lora` section (LoRAConfig)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias="none",
        task_type=task_type,
    )
