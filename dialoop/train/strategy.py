"""How a run is distributed: one process, DDP, FSDP2 or DeepSpeed ZeRO-1/2/3, behind one `Strategy`.

SFT, the reward model and PPO ask the strategy to prepare, back-propagate, step, gather, save and guard
against NaNs; only this file knows which mode runs (see docs/architecture.md, "Distributed training").
It also holds the workarounds that run FSDP and DeepSpeed over gloo on CPUs, where accelerate would not.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    DeepSpeedPlugin,
    DistributedType,
    FullyShardedDataParallelPlugin,
    parse_flag_from_env,
)
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.integrations import unset_hf_deepspeed_config

from dialoop.modeling import pick_device
from dialoop.modeling.loading import ensure_special_tokens, save_model_dir
from dialoop.modeling.trunk import TrunkCache
from dialoop.train.common import TrainState, accumulation_steps, length_buckets, resolve_precision
from dialoop.train.config import TrainConfig

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised when too many consecutive steps had a NaN or inf loss."""


@dataclass
class NonFiniteGuard:
    """Counts steps skipped for a non-finite loss or gradient; too many in a row stop the run."""

    max_consecutive: int = 5

    def update(self, state: TrainState, finite: bool) -> None:
        if finite:
            state.nonfinite_streak = 0
            return
        state.skipped_steps += 1
        state.nonfinite_streak += 1
        logger.warning("step %d: non-finite loss or gradient, update skipped", state.step + 1)
        if state.nonfinite_streak >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{state.nonfinite_streak} steps in a row had a NaN or inf loss (last: {state.step + 1}): "
                "stopped. Lower the learning rate, use --precision fp32, or check the data."
            )


def make_strategy(config: TrainConfig, *, gradient_accumulation_steps: int | None = None) -> Strategy:
    """The run's strategy: bf16 autocast over fp32 weights when the precision resolves to bf16.

    Accumulation steps default to `accumulation_steps(config, num_processes)`.
    """
    if config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    # without an accelerator, processes started by `accelerate launch --multi_gpu` / torchrun join over gloo
    cpu = pick_device().type == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU")
    # accelerate (1.16) keeps its settings in process-wide singletons; a process that runs several stages
    # (the demo) starts each with fresh ones, keeping the process group (PartialState)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    partial = PartialState(cpu=cpu)
    steps = gradient_accumulation_steps or accumulation_steps(config, partial.num_processes)
    precision = resolve_precision(config.precision, partial.device)
    fsdp = parse_flag_from_env("ACCELERATE_USE_FSDP")
    fsdp_on_cpu = fsdp and cpu and partial.num_processes > 1
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if deepspeed and cpu:
        # DeepSpeed's CPU accelerator (read when deepspeed first picks one); it joins the gloo process group
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if fsdp:
        # transformers would load the weights on the first process only (the others get meta tensors for
        # FSDP to fill in); PPO's frozen models and the RM's new head need them on every process
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    if fsdp_on_cpu and os.environ.get("FSDP_VERSION", "1") != "2":
        # FSDP1 trains over gloo, but gathering its full state dict (offload_to_cpu) segfaults in torch 2.13
        raise ValueError("FSDP on CPUs needs FSDP2: pass --fsdp_version 2 to accelerate launch")
    accelerator = Accelerator(
        cpu=cpu, mixed_precision="bf16" if precision == "bf16" else "no", gradient_accumulation_steps=steps
    )
    if fsdp_on_cpu:
        _fsdp_on_cpu(accelerator)
    if deepspeed and cpu and partial.num_processes > 1:
        _deepspeed_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, config, steps, precision)
    strategy = Strategy(accelerator)
    logger.info(
        "accelerator: %d process(es) (%s) on %s, precision %s, %d micro-batch(es) per step",
        accelerator.num_processes,
        accelerator.distributed_type.value + (f" ZeRO-{strategy.zero_stage}" if strategy.zero_stage else ""),
        accelerator.device,
        precision,
        steps,
    )
    return strategy


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Shard with FSDP over gloo, as `accelerate launch --use_fsdp` asks, where accelerate would run DDP.

    accelerate (1.15, 1.16) turns FSDP on for GPU-like devices only: on CPUs it quietly falls back to DDP
    (MULTI_CPU). PyTorch's FSDP works over gloo, so the state is switched to FSDP with the plugin built from
    the launcher's settings, as accelerate does on a GPU; `prepare`, `clip_grad_norm_`, `get_state_dict` and
    `save_state` / `load_state` then take their FSDP paths.
    """
    state = accelerator.state
    if getattr(state, "fsdp_plugin", None) is not None:
        return
    plugin = FullyShardedDataParallelPlugin()
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # accelerate (1.16) keeps the two singletons in step (a later AcceleratorState copies PartialState's type)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _deepspeed_on_cpu(accelerator: Accelerator) -> None:
    """Run DeepSpeed over gloo, as `accelerate launch --use_deepspeed` asks, where accelerate would run DDP.

    accelerate (1.15, 1.16) turns DeepSpeed off on CPUs, as it does FSDP (MULTI_CPU). DeepSpeed (0.19) has a
    CPU accelerator and uses the process group that accelerate started, so the state is switched to DeepSpeed
    with the plugin built from the launcher's settings (`--zero_stage`, `--deepspeed_config_file`, ...), as
    on a GPU.
    """
    state = accelerator.state
    if state.deepspeed_plugins is not None:
        return
    import deepspeed.ops

    # DeepSpeed's (0.19) shared-memory all-reduce serves inference only; loading it compiles C++ at run time
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    plugin = DeepSpeedPlugin()  # precision: see `_configure_deepspeed`
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED


def _configure_deepspeed(accelerator: Accelerator, config: TrainConfig, steps: int, precision: str) -> None:
    """Fit the DeepSpeed config to the run: the loop, not the engine, decides when the optimizer steps.

    - `managed_gradient_accumulation: false`: `accelerator.backward` only accumulates gradients (see
      `_BackwardOnly`) and `optimizer_step` takes the step with `engine.step()`, however many backward passes
      an update has (PPO: a policy and a value loss);
    - the run's micro-batches per step and `--max-grad-norm` (`gradient_clipping`: the engine clips);
    - bf16 is DeepSpeed's `torch_autocast` over fp32 weights (as in every other mode), its gradients reduced
      in fp32; ZeRO-3 gathers the whole model for `save_model`;
    - every process loads whole weights (no `zero.Init` in `from_pretrained`): PPO's frozen models are not
      prepared; `deepspeed.initialize` partitions the trained model.
    """
    plugin = accelerator.state.deepspeed_plugin
    ds_config = plugin.deepspeed_config
    stage = int(plugin.zero_stage)
    if stage not in (1, 2, 3):
        raise ValueError(
            f"DeepSpeed ZeRO stage {stage} is not supported: use --zero_stage 1, 2 or 3 (or DDP)"
        )
    zero = ds_config.setdefault("zero_optimization", {})
    if any(zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")):
        # the offloaded optimizer is DeepSpeedCPUAdam, a C++ op compiled at run time
        raise ValueError("DeepSpeed offload is not supported (it needs DeepSpeed's compiled CPU Adam)")
    gas = ds_config.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", steps):
        logger.warning("DeepSpeed gradient_accumulation_steps %s replaced by the run's %d", gas, steps)
    micro = max(1, config.micro_batch_size)
    ds_config.update(
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=steps,
        train_batch_size=micro * steps * accelerator.num_processes,
        gradient_clipping=max(0.0, config.max_grad_norm),
        managed_gradient_accumulation=False,
    )
    zero["stage3_gather_16bit_weights_on_model_save"] = True
    ds_config["fp16"] = {"enabled": False}
    ds_config["bf16"] = {"enabled": False}
    ds_config.pop("torch_autocast", None)
    if precision == "bf16":
        ds_config["torch_autocast"] = {
            "enabled": True,
            "dtype": "bfloat16",
            "lower_precision_safe_modules": [],
        }
    plugin.zero3_init_flag = False
    plugin.dschf = None
    unset_hf_deepspeed_config()


class _BackwardOnly:
    """What `accelerator.backward` calls under DeepSpeed (in place of accelerate's wrapper, which steps the
    optimizer at the accumulation boundary): `engine.backward`, which scales by 1 / the accumulation steps as
    accelerate does, and accumulates (ZeRO-2/3 reduce the gradients as they come).

    A loss that is not finite is back-propagated times NaN, so that its gradient is not finite either,
    whatever made the loss so: DeepSpeed's ZeRO optimizer skips an update whose gradient norm is not finite,
    on every process, and clears the gradients (see `Strategy.optimizer_step`).
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def backward(self, loss: torch.Tensor, sync_gradients: bool = True, **kwargs: Any) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            loss = loss * float("nan")
        self.engine.backward(loss, **kwargs)

    def get_global_grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)


class TrainedPair(torch.nn.Module):
    """Two named modules as one, for FSDP and DeepSpeed: accelerate shards one model per optimizer, and every
    call must go through the root module (the engine), whose hooks gather and free the shards."""

    def __init__(self, modules: dict[str, torch.nn.Module], like: torch.nn.Module) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        # FSDP's transformer auto-wrap policy looks for the block classes here, and accelerate for the hidden
        # size (DeepSpeed configs with "auto" bucket sizes) in `config`: those of the HF model `like`
        self._no_split_modules = getattr(like, "_no_split_modules", None)
        self.config = getattr(like, "config", None)

    def forward(self, role: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, role)(*args, **kwargs)


class _Role:
    """`pair.forward(role, ...)` as a callable: one module of a sharded `TrainedPair`."""

    def __init__(self, pair: torch.nn.Module, role: str) -> None:
        self.pair, self.role = pair, role

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.pair(self.role, *args, **kwargs)


class PreparedPair:
    """Two modules trained by one optimizer, as `Strategy.prepare_pair` returns them."""

    def __init__(
        self, strategy: Strategy, names: tuple[str, str], calls: tuple[Any, Any], trained: torch.nn.Module
    ) -> None:
        self._strategy = strategy
        self._names = names
        self.first, self.second = calls  # forwards with gradients (DDP's wrappers, or the sharded root's)
        self.trained = trained  # both, for train() and clipping

    def modules(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The two modules as built (their parameters: shards under FSDP and ZeRO-3)."""
        if self._strategy.sharded:
            first, second = (getattr(self.trained, name) for name in self._names)
            return first, second
        unwrap = self._strategy.accelerator.unwrap_model
        return unwrap(self.first), unwrap(self.second)

    def inference(self) -> tuple[Any, Any]:
        """The two forwards without gradients: no DDP wrapper needed; a sharded root still gathers."""
        return (self.first, self.second) if self._strategy.sharded else self.modules()


class Strategy:
    """One run's distribution: wraps its `Accelerator` and does each operation the way its mode needs."""

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: the trained model's parameters, gradients or optimizer state are partitioned."""
        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    @property
    def zero_stage(self) -> int:
        """The DeepSpeed ZeRO stage of the run, 0 when it does not run DeepSpeed."""
        plugin = self.accelerator.state.deepspeed_plugin
        return int(plugin.zero_stage) if plugin is not None else 0

    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16 when the run is mixed precision (accelerate's or DeepSpeed's torch autocast), else fp32."""
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is not None:
            autocast = plugin.deepspeed_config.get("torch_autocast", {})
            return torch.bfloat16 if autocast.get("enabled") else torch.float32
        return torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else torch.float32

    # --- preparing and stepping the trained model ---

    def prepare(self, model: torch.nn.Module, optimizer: Any) -> tuple[Any, Any]:
        """`accelerator.prepare(model, optimizer)` for the trained model; call once per run.

        Under DeepSpeed, `backward` then only accumulates gradients; `optimizer_step` steps the engine.
        """
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            self.accelerator.deepspeed_engine_wrapped = _BackwardOnly(model)
        return model, optimizer

    def prepare_pair(
        self, modules: dict[str, torch.nn.Module], optimizer: Any, *, like: torch.nn.Module
    ) -> tuple[PreparedPair, Any]:
        """Prepare two named modules trained by one optimizer (PPO's policy and value passes).

        FSDP and DeepSpeed shard one model per optimizer: the two become one `TrainedPair` (`like`: the HF
        model whose blocks and config describe it); DDP wraps each.
        """
        (name_a, first), (name_b, second) = modules.items()
        if self.sharded:
            pair, optimizer = self.prepare(TrainedPair(modules, like), optimizer)
            calls = (_Role(pair, name_a), _Role(pair, name_b))
            return PreparedPair(self, (name_a, name_b), calls, pair), optimizer
        first, second, optimizer = self.accelerator.prepare(first, second, optimizer)
        trained = torch.nn.ModuleList([first, second])
        return PreparedPair(self, (name_a, name_b), (first, second), trained), optimizer

    def check_lora(self, lora_r: int) -> None:
        """Refuse LoRA where the trained model is sharded (FSDP, DeepSpeed)."""
        if self.sharded and lora_r > 0:
            raise ValueError(
                "LoRA (--lora-r) does not run under FSDP or DeepSpeed: use DDP, or full fine-tuning"
            )

    def backward(self, loss: Tensor) -> None:
        """Back-propagate `loss` (accumulating, scaled by 1 / the accumulation steps)."""
        self.accelerator.backward(loss)

    def all_finite(self, local_finite: bool) -> bool:
        """True when the value is finite on every process (one all-reduce)."""
        flag = torch.tensor([0.0 if local_finite else 1.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() == 0)

    def optimizer_step(
        self,
        model: torch.nn.Module,
        optimizer: Any,
        scheduler: Any,
        *,
        loss_finite: bool,
        max_grad_norm: float,
        state: TrainState,
        guard: NonFiniteGuard,
    ) -> float | None:
        """Clip, step and zero the gradients, unless the loss or the gradient is non-finite on any process.

        Returns the gradient norm before clipping (None when the step was skipped). Advances `state.step`.
        """
        finite = self.all_finite(loss_finite)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            return _engine_step(
                model, scheduler, finite=finite, max_grad_norm=max_grad_norm, state=state, guard=guard
            )
        grad_norm: float | None = None
        if finite:
            # an infinite max norm measures without clipping
            norm = self.accelerator.clip_grad_norm_(
                model.parameters(), max_grad_norm if max_grad_norm > 0 else math.inf
            )
            grad_norm = float(norm)
            finite = math.isfinite(grad_norm)
        guard.update(state, finite)
        if finite:
            optimizer.step()
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        return grad_norm if finite else None

    # --- passes of a sharded model ---

    def forward_passes(
        self, lengths: Sequence[int], rows: Sequence[int], max_rows: int, overhead_tokens: int
    ) -> list[list[int]]:
        """`rows` grouped into forward passes of at most `max_rows` rows of similar `lengths`.

        Sharded, each forward gathers with the other processes, so the number of passes must not depend on
        this process's lengths: full passes of rows sorted by length (every process has as many rows).
        """
        if self.sharded:
            order = sorted(rows, key=lambda r: -lengths[r])
            return [order[i : i + max_rows] for i in range(0, len(order), max_rows)]
        # in index order: the same rows make the same passes (and so the same shared prefix, part of each
        # row's `TrunkCache` key) whatever order an epoch visits them in
        ordered = sorted(rows)
        groups = length_buckets([lengths[r] for r in ordered], max_rows, overhead_tokens)
        return [sorted(ordered[i] for i in group) for group in groups]

    def trunk_cache(self) -> TrunkCache | None:
        """A fresh `TrunkCache`; None when sharded (each block's forward gathers with the other processes,
        so every process must run every block)."""
        return None if self.sharded else TrunkCache()

    # --- whole tensors and models ---

    @contextmanager
    def gathered(self, module: torch.nn.Module, *, modify: bool = False) -> Iterator[None]:
        """Inside the block, `module`'s parameters are whole under ZeRO-3 (a collective: every process
        enters); with `modify`, what the first process writes into them is kept. Other modes: nothing to do
        (FSDP shards are DTensors, see `full`)."""
        if self.zero_stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(
            list(module.parameters()), modifier_rank=0 if modify else None
        ):
            yield

    @staticmethod
    def full(t: Tensor) -> Tensor:
        """The whole tensor of an FSDP shard (a collective: every process must ask), or the tensor itself."""
        return t.full_tensor() if isinstance(t, DTensor) else t

    @staticmethod
    def shard_like(like: Tensor, full: Tensor) -> Tensor:
        """`full` cut into this process's shard of `like` when `like` is an FSDP shard (no communication)."""
        if not isinstance(like, DTensor):
            return full
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)

    def whole_copy(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """A copy of `model` (call before it is prepared) in the compute dtype to generate from; None where
        the model itself serves: fp32 weights, not sharded.

        Generating from fp32 master weights under autocast would re-cast every weight at every token. Sharded,
        the copy is always made (in fp32 too): each process samples replies of its own lengths, which sharded
        weights, gathered at every call together with the other processes, cannot serve.
        """
        if self.compute_dtype == torch.float32 and not self.sharded:
            return None
        return copy.deepcopy(model).to(self.compute_dtype)

    @torch.no_grad()
    def copy_whole(self, source: torch.nn.Module, target: torch.nn.Module) -> None:
        """Copy the whole weights of the (maybe sharded) `source` into `target` (a collective)."""
        with self.gathered(source):
            for dst, src in zip(target.parameters(), source.parameters(), strict=True):
                dst.copy_(self.full(src))

    def save_model(self, model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> None:
        """Write a standard HF dir (fp32 weights, tokenizer, chat template) into `out_dir`; call on every
        process.

        `model` is the prepared HF model, or a training module that holds it as `.hf_model` (under ZeRO-3 it
        may also be a part of the engine's module: PPO's policy). The files are written to a temp dir first
        and then moved in, so a crash never leaves half a weight file; other files of `out_dir` stay.
        """
        accelerator = self.accelerator
        whole = accelerator.unwrap_model(model)
        with self.gathered(whole):  # ZeRO-3: the weights are whole in this block
            state_dict: dict[str, Any] | None = None
            if self.zero_stage == 3:
                if accelerator.is_main_process:
                    state_dict = {k: v.detach().clone() for k, v in whole.state_dict().items()}
            elif self.sharded:
                state_dict = accelerator.get_state_dict(model)  # a collective under FSDP
            if accelerator.is_main_process:
                _write_model_dir(whole, state_dict, tokenizer, Path(out_dir), sharded=self.sharded)
        accelerator.wait_for_everyone()


def _engine_step(
    engine: Any,
    scheduler: Any,
    *,
    finite: bool,
    max_grad_norm: float,
    state: TrainState,
    guard: NonFiniteGuard,
) -> float | None:
    """`optimizer_step` under DeepSpeed: `engine.step()` clips, steps (unless the gradient norm is not finite)
    and clears the gradients; the LR schedule, not prepared, advances with the updates taken.

    The engine clips at `gradient_clipping` = `max_grad_norm` (set by `make_strategy`); a non-finite loss was
    back-propagated as NaN (`_BackwardOnly`), so the ZeRO optimizer skips the same updates as other modes.
    """
    if engine.gradient_clipping() != max(0.0, max_grad_norm):
        raise RuntimeError(f"DeepSpeed clips at {engine.gradient_clipping()}, the run asks {max_grad_norm}")
    engine.step()
    if engine.zero_optimization_stage() == 3:
        # DeepSpeed (0.19) ZeRO-3 copies a gradient into its partition at an update's first backward and adds
        # it at later ones: a parameter whose first gradient comes later (PPO's value model, after the
        # policy's passes) would add onto the last update's (or a skipped update's NaN). Cleared, every
        # backward may add.
        engine.optimizer.grad_partitions_flat_buffer.zero_()
    applied = bool(engine.was_step_applied())
    if applied and not finite:
        raise RuntimeError("DeepSpeed applied an update whose loss was not finite")
    guard.update(state, applied)
    if applied:
        scheduler.step()
    state.step += 1
    norm = engine.get_global_grad_norm()
    return float(norm) if applied and norm is not None else None


def _share_tied_tensors(model: torch.nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Make the gathered copies of one tied parameter (embeddings and LM head) one tensor again.

    A gathered full state dict holds a separate copy under each name; `save_pretrained` then writes both,
    unlike a plain save. One shared tensor lets transformers drop the alias as it always does.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    out = dict(state_dict)
    for group in names.values():
        kept = next((n for n in group if n in out), None)
        for name in group:
            if kept is not None and name in out:
                out[name] = out[kept]
    return out


def _write_model_dir(
    unwrapped: Any,
    state_dict: dict[str, Any] | None,
    tokenizer: Any,
    out_dir: Path,
    *,
    sharded: bool,
) -> None:
    if hasattr(unwrapped, "hf_model"):
        unwrapped = unwrapped.hf_model
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    if state_dict is not None:
        state_dict = _share_tied_tensors(unwrapped, state_dict)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".final-"))
    try:
        if sharded:
            ensure_special_tokens(unwrapped, tokenizer)
            unwrapped.save_pretrained(tmp / "model", state_dict=state_dict)
            tokenizer.save_pretrained(tmp / "model")
        else:
            save_model_dir(unwrapped, tokenizer, tmp / "model")
        # config.json last: a dir with a config but no weights never appears
        for path in sorted((tmp / "model").iterdir(), key=lambda p: p.name == "config.json"):
            path.chmod(0o644)
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("model written to %s", out_dir)
