"""The run configuration of ``python -m latentr3_fast.train``, generated from three dataclasses.

``RunArgs`` holds what is not a trainer setting (data, model, stages, output, machine,
evaluation); every field of ``SFTConfig`` and ``GRPOConfig`` becomes a flag of its own
(``--sft-<name>``, ``--grpo-<name>``, or the spelling in its ``metadata["flag"]``), except the
fields in ``TRAINER_FIELDS_FROM_RUN``, which the pipeline fills from run arguments. ``RunConfig``
is the flat union of them all: one attribute per flag, as the YAML ``--config`` file and the
saved ``config.yaml`` spell them.

Precedence: built-in defaults < ``--config FILE.yaml`` < command-line flags. The effective
configuration is written next to the results (``config.yaml``) so every run can be repeated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .configs import GRPOConfig, OptionError, SFTConfig

STAGES = ("sft", "grpo", "eval", "all")

# The tiny-backbone profile (a tiny Qwen2 trained from scratch on CPU). It applies whenever no
# --model is given, whatever the data (synthetic or real), and only to options the user did not
# set; the reference hyperparameters (paper App. C) stay the defaults for pretrained backbones.
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "sft_lr": 3e-3,
    "sft_batch_size": 32,
    "sft_micro_batch_size": 32,
    "sft_epochs": 3.0,
    "sft_warmup_steps": 20,
    "sft_patience": 2,
    "grpo_lr": 1e-4,
    "prompts_per_step": 16,
    "grpo_micro_batch_prompts": 16,
    "grpo_warmup_steps": 5,
    "grpo_epochs": 1.0,
    "sigma": 1.5,
    "max_length": 256,
    "eval_batch_size": 32,
}


@dataclass
class RunArgs:
    """The options of a run that are not a setting of one trainer: data, model, stages, output,
    machine, evaluation, and the few flags that map onto trainer fields by a rule
    (``TRAINER_FIELDS_FROM_RUN``). Field docs (the ``help`` metadata) are the ``--help`` text."""

    # --- run ---
    data: str = field(
        default="synthetic",
        metadata={
            "help": "'synthetic' (embedded default), a standard-layout DIR (its own "
            "train/valid/test files), or recbole:DIR/NAME (RecBole atomic files NAME.inter + "
            "NAME.item, split by the global temporal 80/10/10 rule of the paper: all samples "
            "sorted by target time, not leave-one-out)"
        },
    )
    category: str | None = field(
        default=None,
        metadata={
            "help": "category name for the prompt, e.g. 'movies' (default: from the data's "
            "name: CDs_and_Vinyl -> musics; for recbole:DIR/NAME the NAME)"
        },
    )
    model: str | None = field(
        default=None,
        metadata={
            "help": "HF causal LM name or local path (e.g. Qwen/Qwen2.5-1.5B-Instruct); "
            "default: a tiny Qwen2 built from a config with a BPE tokenizer trained on the data"
        },
    )
    stage: str = field(default="all", metadata={"help": "sft | grpo | eval | all"})
    output_dir: str = field(default="runs/latentr3", metadata={"help": "where results go"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16"}
    )
    seed: int = field(default=42, metadata={"help": "seed of everything"})
    threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads of this process (default: physical cores, at most the cores "
            "this process may use, minus those busy with other processes; OMP_NUM_THREADS wins)"
        },
    )
    resume: bool = field(default=False, metadata={"help": "continue a run in --output-dir"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace a previous run in --output-dir"}
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "cap on optimizer steps per stage"}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "use the first N train rows"}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "evaluate the first N rows"}
    )
    save_steps: int | None = field(
        default=None,
        metadata={
            "help": "also checkpoint every N optimizer steps (always: SFT per epoch, GRPO at "
            "end, and both on Ctrl-C/SIGTERM after the step in flight)"
        },
    )
    optim: str = field(
        default="adamw", metadata={"help": "adamw | adamw_8bit (bitsandbytes, CUDA)"}
    )
    baseline: bool = field(
        default=True,
        metadata={
            "help": "also train+evaluate the 'w/o reasoning' baseline (num_latent=0) in stage all"
        },
    )

    # --- synthetic data / tiny model (embedded default only) ---
    synthetic_items: int = field(default=400, metadata={"help": "items of the synthetic catalogue"})
    synthetic_users: int = field(default=600, metadata={"help": "users of the synthetic catalogue"})
    tiny_hidden_size: int = field(
        default=128, metadata={"help": "hidden size of the tiny backbone"}
    )
    tiny_layers: int = field(default=1, metadata={"help": "layers of the tiny backbone"})
    tokenizer_vocab: int = field(
        default=1024, metadata={"help": "BPE vocabulary of the tiny tokenizer"}
    )

    # --- model / prompt ---
    num_latent: int = field(
        default=1, metadata={"help": "latent reasoning steps N (0 = w/o reasoning)"}
    )
    latent_mode: str = field(
        default="ratt", metadata={"help": "ratt (LatentRATT) | hidden (w/o LatentRATT)"}
    )
    template: str = field(
        default="reference", metadata={"help": "prompt template: reference | clean"}
    )
    max_length: int = field(
        default=512, metadata={"help": "max tokens per sequence (left-truncated)"}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "flash_attention_2 | sdpa | eager (default: flash-attn on CUDA if importable)"
        },
    )

    # --- stage options that map onto trainer fields by a rule (TRAINER_FIELDS_FROM_RUN) ---
    sft_batch_size: int = field(
        default=128, metadata={"help": "SFT effective batch (samples per step)"}
    )
    sft_micro_batch_size: int = field(default=16, metadata={"help": "SFT samples per forward"})
    sft_epochs: float = field(
        default=3.0, metadata={"help": "SFT epochs (early stopping may end sooner)"}
    )
    grpo_select: str = field(
        default="best",
        metadata={
            "help": "GRPO weights evaluated as LatentR3: best (best validated step, step 0 = "
            "the SFT model included) | last (the reference: the last step)"
        },
    )

    # --- evaluation ---
    num_beams: int = field(default=10, metadata={"help": "beams of the constrained beam search"})
    length_penalty: list[float] = field(
        default_factory=lambda: [1.0, 0.0],
        metadata={"help": "one or more: 1.0 = BIGRec scoring, 0.0 = D3 scoring"},
    )
    beam_stop: str = field(
        default="reference",
        metadata={
            "help": "beam stopping rule: reference (HF generate's default early_stopping=False, "
            "what the reference evaluation ran) | exact (early_stopping='never': never prunes "
            "a hypothesis that could still win; differs only with length penalty > 0)"
        },
    )
    rank: str = field(
        default="beam",
        metadata={"help": "beam | exact (full-catalogue teacher-forced) | ground (BIGRec L2)"},
    )
    eval_batch_size: int = field(default=16, metadata={"help": "prompts per evaluation batch"})
    exclude_seen: bool = field(
        default=False,
        metadata={
            "help": "drop items of the user's history from the ranked predictions (the "
            "reference keeps them)"
        },
    )


# The one explicit mapping between run arguments and trainer fields. A trainer field named like
# a run argument (seed, resume, optim, save_steps, max_steps, max_*_samples, eval_batch_size)
# takes its value; the fields below are computed from the run argument named here (see
# ``RunConfig.sft_config`` / ``grpo_config``); every other field has a flag of its own.
TRAINER_FIELDS_FROM_RUN: dict[type, dict[str, str]] = {
    SFTConfig: {
        "output_dir": "output_dir",  # OUTPUT_DIR/sft (or sft_baseline)
        "epochs": "sft_epochs",  # rounded up
        "batch_size": "sft_micro_batch_size",  # at most --sft-batch-size
        "grad_accum": "sft_batch_size",  # --sft-batch-size / micro-batch
        "eval_batch_size": "eval_batch_size",  # twice the evaluation batch (no beams)
    },
    GRPOConfig: {
        "output_dir": "output_dir",  # OUTPUT_DIR/grpo
        "load_best_at_end": "grpo_select",  # best -> True, last -> False
    },
}
FLAG_PREFIX = {SFTConfig: "sft_", GRPOConfig: "grpo_"}
RUN_ARG_NAMES = frozenset(f.name for f in dataclasses.fields(RunArgs))


def trainer_option_names(cls: type) -> dict[str, str]:
    """``{trainer field: RunConfig field / flag name}`` for the fields of ``cls`` that have a
    flag of their own."""
    names = {}
    for f in dataclasses.fields(cls):
        if f.name in RUN_ARG_NAMES or f.name in TRAINER_FIELDS_FROM_RUN[cls]:
            continue
        names[f.name] = f.metadata.get("flag", FLAG_PREFIX[cls] + f.name)
    return names


def _generated_fields() -> list[tuple[str, Any, Any]]:
    """The trainer options as ``make_dataclass`` fields (tuples become lists, as in YAML)."""
    out = []
    for cls in (SFTConfig, GRPOConfig):
        hints = typing.get_type_hints(cls)
        by_name = {f.name: f for f in dataclasses.fields(cls)}
        for name, flag in trainer_option_names(cls).items():
            tp, f = hints[name], by_name[name]
            if typing.get_origin(tp) is tuple:
                tp = list[typing.get_args(tp)[0]]
                spec = field(default_factory=lambda d=f.default: list(d), metadata=f.metadata)
            else:
                spec = field(default=f.default, metadata=f.metadata)
            out.append((flag, tp, spec))
    names = [name for name, _, _ in out]
    clash = (set(names) & RUN_ARG_NAMES) | {n for n in names if names.count(n) > 1}
    assert not clash, f"trainer options clash with other options: {sorted(clash)}"
    return out


TrainerOptions = dataclasses.make_dataclass("TrainerOptions", _generated_fields())
TrainerOptions.__doc__ = "Every SFTConfig/GRPOConfig field with a flag, under its flag name."
TrainerOptions.__module__ = __name__


@dataclass
class RunConfig(TrainerOptions, RunArgs):
    """Every option of the pipeline: ``RunArgs`` plus the generated ``TrainerOptions``."""

    def sft_config(self, output_dir: str | None) -> SFTConfig:
        """The SFT stage's options (raises ConfigError naming the flag of a bad value)."""
        micro = min(self.sft_micro_batch_size, self.sft_batch_size)
        computed = {
            "output_dir": output_dir,
            "epochs": max(1, math.ceil(self.sft_epochs)),
            "batch_size": micro,
            "grad_accum": max(1, self.sft_batch_size // micro),
            "eval_batch_size": self.eval_batch_size * 2,
        }
        return self._trainer_config(SFTConfig, computed)

    def grpo_config(self, output_dir: str | None, num_train: int | None = None) -> GRPOConfig:
        """The GRPO stage's options; ``num_train`` (the train rows) caps ``prompts_per_step``."""
        computed: dict[str, Any] = {
            "output_dir": output_dir,
            "load_best_at_end": self.grpo_select == "best",
        }
        if num_train is not None:
            computed["prompts_per_step"] = min(self.prompts_per_step, num_train)
        return self._trainer_config(GRPOConfig, computed)

    def _trainer_config(self, cls: type, computed: dict[str, Any]) -> Any:
        values = {name: getattr(self, name) for name in RUN_ARG_NAMES & _field_names(cls)}
        for name, flag in trainer_option_names(cls).items():
            value = getattr(self, flag)  # a tuple field is a list here, as in YAML
            values[name] = tuple(value) if isinstance(value, list) else value
        values.update(computed)
        try:
            return cls(**values)
        except OptionError as exc:
            own = trainer_option_names(cls) | TRAINER_FIELDS_FROM_RUN[cls]
            raise ConfigError(exc.rendered(lambda n: f"--{_flag(own.get(n, n))}")) from exc

    def validate(self) -> None:
        """Raise ConfigError naming the option when a value is out of range: the run's own
        checks, then the options of each trainer the stage runs."""
        self._check_run_args()
        if self.stage in ("sft", "all"):
            self.sft_config(self.output_dir)
        if self.stage in ("grpo", "all"):
            self.grpo_config(self.output_dir)

    def _check_run_args(self) -> None:
        choices = {
            "stage": STAGES,
            "latent_mode": ("ratt", "hidden"),
            "template": ("reference", "clean"),
            "rank": ("beam", "exact", "ground"),
            "beam_stop": ("reference", "exact"),
            "dtype": ("auto", "fp32", "bf16", "fp16"),
            "grpo_select": ("best", "last"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"--{_flag(name)}: {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        positive = ("num_beams", "sft_batch_size", "sft_micro_batch_size", "eval_batch_size")
        for name in (*positive, "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.num_latent < 0:
            raise ConfigError(f"--num-latent must be >= 0, got {self.num_latent}")
        if self.optim == "adamw_8bit":
            from .optim import check_bitsandbytes

            check_bitsandbytes("--optim adamw_8bit")
        if self.estimator == "score" and self.num_latent > 1:
            raise ConfigError(
                f"--estimator score supports --num-latent 1 only (got {self.num_latent}): "
                "the Gaussian policy covers the first latent, not the later ones"
            )
        if not self.length_penalty:
            raise ConfigError("--length-penalty needs at least one value")


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def uses_tiny_backbone(cfg: RunConfig) -> bool:
    """True when no --model is given: the tiny backbone is trained from scratch."""
    return cfg.model is None


def apply_embedded_defaults(cfg: RunConfig, given: set[str]) -> RunConfig:
    """Replace the reference defaults by the tiny-backbone profile for options not given.

    The profile is what makes a from-scratch tiny model train at all (the reference's lr 3e-4
    and batch 128 are tuned for a pretrained 1.5B model); it applies to ANY data, real or
    synthetic, whenever the backbone is the tiny one."""
    if not uses_tiny_backbone(cfg):
        return cfg
    updates = {k: v for k, v in EMBEDDED_DEFAULTS.items() if k not in given}
    return dataclasses.replace(cfg, **updates)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(element type, is_list) of a field annotation such as ``int | None`` or ``list[float]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser. Defaults are SUPPRESSed so that only flags the user gave override."""
    parser = argparse.ArgumentParser(
        prog="python -m latentr3_fast.train",
        description="LatentR3: SFT warm-up -> modified GRPO -> constrained-beam evaluation. "
        "With no arguments: the embedded default (synthetic catalogue, tiny Qwen2, CPU).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        epilog="Without --model (the tiny backbone, on any data) these replace the "
        "defaults, for options you do not set: "
        + ", ".join(f"--{_flag(k)} {v}" for k, v in EMBEDDED_DEFAULTS.items()),
    )
    parser.add_argument("--config", help="YAML file of options (flags override it)")
    defaults = RunConfig()
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        tp, is_list = _base_type(hints[f.name])
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        flag = f"--{_flag(f.name)}"
        if tp is bool:
            parser.add_argument(
                flag, type=_parse_bool, nargs="?", const=True, metavar="BOOL", help=help_text
            )
        elif is_list:
            parser.add_argument(flag, type=tp, nargs="+", help=help_text)
        else:
            parser.add_argument(flag, type=tp, help=help_text)
    return parser


def load_config(argv: list[str] | None = None) -> tuple[RunConfig, set[str]]:
    """Parse argv (defaults < YAML file < flags) into a validated RunConfig.

    Returns the config and the names of the options the user set (in the file or as flags).
    """
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file is not None:
        values.update(read_yaml_config(Path(config_file)))
    values.update(args)
    cfg = RunConfig(**values)
    return cfg, set(values)


def read_yaml_config(path: Path) -> dict[str, Any]:
    """Read a YAML options file; keys may use '-' or '_'. Unknown keys are an error."""
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot be read ({exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--config {path}: not valid YAML: {where}{what}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        out[name] = _coerce(name, value, f"--config {path}")
    return out


def _coerce(name: str, value: Any, where: str) -> Any:
    """Convert a YAML value to the field's type (YAML reads ``3e-4`` as a string)."""
    tp, is_list = _base_type(typing.get_type_hints(RunConfig)[name])
    if value is None:
        return None
    convert = _parse_bool if tp is bool else tp
    try:
        if is_list:
            items = value if isinstance(value, list) else [value]
            return [convert(v) if isinstance(v, str) else tp(v) for v in items]
        if isinstance(value, str) and tp is not str:
            return convert(value)
        return value if tp is bool or isinstance(value, tp) else tp(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise ConfigError(
            f"{where}: option {name!r}: cannot read {value!r} as {tp.__name__}"
        ) from exc


def save_config(cfg: RunConfig, path: Path) -> None:
    """Write the effective configuration as YAML (flags with '-', as on the command line)."""
    data = {_flag(k): v for k, v in dataclasses.asdict(cfg).items()}
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
