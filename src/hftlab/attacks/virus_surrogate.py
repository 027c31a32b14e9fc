"""The surrogate of the Virus attack (:mod:`hftlab.attacks.virus`, whose docstring documents the
attack): the attacker's copy of the victim, where the virus sits in a rendered row, and the
gradient-similarity term matched on it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from hftlab.attacks.gcg import illegal_tokens
from hftlab.config import ConfigError
from hftlab.data.records import Example

if TYPE_CHECKING:
    from hftlab.context import RunContext
    from hftlab.formatting import PromptFormatter

IGNORE_INDEX = -100
#: The modules of ``base_weights`` when ``params`` is None (the reference LoRA's targets, train.py
#: ``target_modules=["q_proj","k_proj","v_proj"]``).
REFERENCE_PARAMS = ("q_proj", "k_proj", "v_proj")
#: Marks where the virus goes in a rendered text (a private-use character, which no chat
#: template rewrites).
SENTINEL = "\ue000virus\ue000"


@dataclass
class Layout:
    """Token ids of one poisoned row around its virus: ``prompt`` (context), ``head`` (the benign
    answer closed by its end-of-turn marker) and ``tail`` (the end marker after the virus)."""

    prompt: list[int]
    head: list[int]
    tail: list[int]

    def ids(self, virus: Sequence[int]) -> list[int]:
        return [*self.prompt, *self.head, *virus, *self.tail]


def matched_parameters(model: torch.nn.Module, match_on: str,
                       params: Sequence[str] | None) -> list[str]:
    """Names of the weights whose gradient is matched: ``aligned_lora``: the LoRA A and B
    matrices of the adapter (of the modules in ``params`` only, when given); ``base_weights``:
    the weights of the modules in ``params`` (default q/k/v)."""
    if match_on == "aligned_lora":
        names = [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        if params is not None:
            names = [n for n in names if n.split(".lora_")[0].rsplit(".", 1)[-1] in params]
        if not names:
            raise ConfigError(f"attack 'virus' (match_on: aligned_lora): the surrogate has no "
                              f"LoRA weights{'' if params is None else f' on {list(params)}'}")
        return names
    wanted = set(REFERENCE_PARAMS if params is None else params)
    names = [f"{name}.weight" for name, module in model.named_modules()
             if name.rsplit(".", 1)[-1] in wanted
             and isinstance(getattr(module, "weight", None), torch.nn.Parameter)]
    if not names:
        present = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n})
        raise ConfigError(f"attack_args.params of 'virus' ({sorted(wanted)}) names no module "
                          f"of the surrogate; its modules include {present}")
    return names


class Surrogate:
    """The attacker's copy of the victim: frozen fp32 weights with eager attention (the double
    backward needs the math kernel, which the reference forces too), its tokenizer and prompt
    formatter, and the weights whose gradient is matched (``param_names``)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, formatter: PromptFormatter,
                 param_names: Sequence[str], info: dict[str, Any] | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.formatter = formatter
        for p in model.parameters():
            p.requires_grad_(False)
        named = dict(model.named_parameters())
        self.param_names = list(param_names)
        self.params = [named[name] for name in self.param_names]
        for p in self.params:
            p.requires_grad_(True)  # only autograd.grad reads them; nothing updates them
        self.embed = model.get_input_embeddings().weight
        self.illegal = illegal_tokens(tokenizer, self.embed.shape[0])
        self.info = {**(info or {}), "params": len(self.params),
                     "param_elements": sum(p.numel() for p in self.params)}

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def layout(self, example: Example, response: str) -> Layout:
        """Where a virus appended to ``response`` sits in ``example``'s rendered row."""
        from hftlab.formatting import DEFAULT_SYSTEM, SYSTEM_PROMPT_KEY

        system = example.meta.get(SYSTEM_PROMPT_KEY, DEFAULT_SYSTEM)
        text = self.formatter.completion_text(example.prompt, response + SENTINEL, system)
        cut = text.find(SENTINEL)
        if cut < 0:
            raise ConfigError("attack 'virus': the prompt format drops text appended to the "
                              "answer, so no virus can be placed in it")
        return Layout(self.formatter.encode_prompt(example.prompt, system),
                      self.tokens(text[:cut]), self.tokens(text[cut + len(SENTINEL):]))

    def loss(self, layout: Layout, virus: torch.Tensor,
             onehot: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over the answer (benign answer, virus, end marker), as
        the reference's label smoother with ε=0; the virus enters as ``onehot @ E`` if given."""
        from hftlab.model import causal_lm_parts

        device = self.device
        before = torch.tensor(layout.prompt + layout.head, dtype=torch.long, device=device)
        after = torch.tensor(layout.tail, dtype=torch.long, device=device)
        virus = virus.to(device)
        table = self.model.get_input_embeddings()
        middle = table(virus) if onehot is None else onehot.to(self.embed.dtype) @ self.embed
        embeds = torch.cat([table(before), middle, table(after)])
        ids = torch.cat([before, virus, after])
        targets = ids[1:].clone()
        targets[: len(layout.prompt) - 1] = IGNORE_INDEX
        body, head = causal_lm_parts(self.model)
        out = body(inputs_embeds=embeds[None])
        hidden = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[0, :-1]
        keep = targets != IGNORE_INDEX
        return F.cross_entropy(head(hidden[keep]).float(), targets[keep])

    def gradient(self, layout: Layout, virus: torch.Tensor, onehot: torch.Tensor | None = None,
                 create_graph: bool = False) -> list[torch.Tensor]:
        """∇_w of :meth:`loss` for the matched weights ``w``."""
        loss = self.loss(layout, virus, onehot)
        return list(torch.autograd.grad(loss, self.params, create_graph=create_graph))


def similarity_term(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
    """The reference's gradient-similarity loss (trainer.py ``loss3``): −Σ⟨g, g*⟩ / ‖g‖, with
    ‖g‖ computed under no_grad; in value −‖g*‖·cos(g, g*)."""
    norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads))
    return -sum((g.float() * t.float()).sum() for g, t in zip(grads, target)) / norm


def cosine(grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> float:
    dot = sum(float((g.float() * t.float()).sum()) for g, t in zip(grads, target))
    norms = [math.sqrt(sum(float((x.float() ** 2).sum()) for x in v)) for v in (grads, target)]
    return dot / max(norms[0] * norms[1], 1e-30)


# --------------------------------------------------------------------------------- loading


def aligned_adapter_folder(run: RunContext | None, adapter: str | None) -> tuple[Path, str]:
    """(folder, where it comes from) of the aligned LoRA the gradient is matched on: ``adapter``
    when given, else the alignment checkpoint of the bound ``run``; not checked for existence
    (see :func:`load_surrogate`)."""
    if adapter is not None:
        return Path(adapter).expanduser(), "attack_args.adapter"
    if run is None:
        raise ConfigError("attack 'virus' (match_on: aligned_lora) matches gradients on the "
                          "aligned model's LoRA: set attack_args.adapter to its folder, or "
                          "have the pipeline call attack.prepare(ctx) before building data")
    if not run.config.alignment.enabled:
        raise ConfigError("attack 'virus' (match_on: aligned_lora): alignment is disabled, "
                          "so there is no aligned LoRA; use match_on: base_weights")
    return run.cache_dir / "aligned" / run.alignment_key() / "model", "alignment cache"


def started_from(adapter_folder: Path) -> Path | None:
    """The cached alignment an aligned checkpoint was trained on top of (``starts_from`` in its
    meta.json, TAR's safeguarded start), or None."""
    import json

    meta = adapter_folder.parent / "meta.json"
    if adapter_folder.name != "model" or not meta.is_file():
        return None
    start = json.loads(meta.read_text()).get("starts_from")
    return Path(start) if start else None


def load_surrogate(run: RunContext | None, model_name: str | None, adapter: str | None,
                   match_on: str, params: Sequence[str] | None) -> Surrogate:
    """The surrogate of the attack options ``model`` (``model_name``; None: the bound
    ``run``'s model), ``adapter``, ``match_on`` and ``params``."""
    from peft import PeftModel

    from hftlab.config import Config, ModelConfig
    from hftlab.formatting import PromptFormatter
    from hftlab.judges.common import resolve_device
    from hftlab.model import load_model, load_tokenizer, load_trained, resolve_model_path

    if model_name is not None:
        cache = run.cache_dir if run is not None else Config().resolved_cache_dir()
        path = resolve_model_path(model_name, cache)
        # the run's prompt settings when bound, else its chat template (Alpaca without one)
        cfg = (replace(run.config.model, name=model_name, revision=None) if run is not None
               else ModelConfig(name=model_name))
        tokenizer = load_tokenizer(path, cfg)
        if run is None and not getattr(tokenizer, "chat_template", None):
            cfg = replace(cfg, prompt_format="alpaca")
        formatter = PromptFormatter(tokenizer, cfg)
        device = run.device if run is not None else resolve_device("auto")
    elif run is not None:
        path, cfg, tokenizer = run.model_path, run.config.model, run.tokenizer
        formatter, device = run.formatter, run.device
    else:
        raise ConfigError(
            "attack 'virus' optimises against a copy of the victim model: set "
            "attack_args.model (e.g. the run's model.name), or have the pipeline call "
            "attack.prepare(ctx) before building the data")
    info: dict[str, Any] = {"model": path, "prompt_format": cfg.prompt_format,
                            "from": "attack_args.model" if model_name is not None else "run",
                            "match_on": match_on}
    if match_on == "aligned_lora":
        folder, source = aligned_adapter_folder(run, adapter)
        if not (folder / "adapter_config.json").is_file():
            raise ConfigError(missing_adapter_message(folder, source))
        info.update(adapter=str(folder), adapter_from=source)
    model = load_model(path, replace(cfg, dtype="float32", attn_implementation="eager"),
                       device, "fp32")
    if match_on == "aligned_lora":
        start = started_from(folder)
        if start is not None:  # an alignment on top of the SFT alignment (TAR): merge that first
            model = load_trained(model, start / "model")
            info["adapter_starts_from"] = str(start)
        model = PeftModel.from_pretrained(model, str(folder))  # unmerged, as single_lora
    elif adapter is not None:
        model = load_trained(model, Path(adapter).expanduser())
        info["adapter"] = adapter
    names = matched_parameters(model, match_on, params)
    return Surrogate(model, tokenizer, formatter, names, info)


def missing_adapter_message(folder: Path, source: str) -> str:
    """Why ``folder`` (from ``source``) cannot be the aligned LoRA, and what to do instead."""
    if folder.is_dir():
        return (f"attack 'virus' (match_on: aligned_lora): {folder} ({source}) is not a LoRA "
                "adapter (a fully fine-tuned alignment?); use match_on: base_weights, with "
                "adapter pointing at it")
    if source == "alignment cache":
        return (f"attack 'virus' (match_on: aligned_lora) matches gradients on the run's "
                f"aligned LoRA, but {folder} is not trained yet: the data stage runs before "
                "the alignment. Align first with a run that shares this alignment (e.g. the "
                "same config with attack=harmful_mix; a sweep's first run of the group does "
                "it), set attack_args.adapter, or use match_on: base_weights")
    return f"attack 'virus': attack_args.adapter {folder} has no adapter_config.json"
