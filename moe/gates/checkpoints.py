"""Checkpoint files: read safely (tensors, plain types and the project's settings, nothing else),
checked against the model that loads them (:func:`check_checkpoint`, called by the CLI and by
``GatedMoE.on_load_checkpoint``) and found by name within one run's own folder.

A run's folder is ``<default_root_dir>/lightning_logs/<fusion>-<experts>/version_N`` (TensorBoard
events, ``hparams.yaml``, ``checkpoints/``). ``--ckpt_path best`` / ``last`` look only in the newest
version of the run named by the command's own ``--model.fusion`` / ``--model.experts``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from moe.data.synth import SynthConfig
from moe.experts.bundle import ExpertsMismatchError
from moe.gates.fusions import default_family, stack_label_gates
from moe.gates.sigma_map import N_CELLS

RUNS_DIR = "lightning_logs"
LAST = "last.ckpt"


class CheckpointError(ExpertsMismatchError):
    """A checkpoint that cannot be found or read; the message names the file or folder."""


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True`` (a file that needs more is rejected, named)."""
    try:
        with torch.serialization.safe_globals([SynthConfig]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: no such checkpoint file") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a loadable moe checkpoint ({exc})") from exc


def check_checkpoint(
    model, checkpoint: dict, source: str | os.PathLike, data: str | None = None, data_source: str = "the datamodule"
) -> None:
    """Refuse a checkpoint that does not fit ``model`` (a ``GatedMoE``), with one line naming ``source`` and
    what differs, in this order: the gate variant (:func:`check_variant`), the data its experts were fitted
    on (fingerprints; when ``data``, the fingerprint of ``data_source``, is known), the tensors' names and
    shapes (:func:`check_state_fits`, after :func:`upgrade_state` has brought an earlier moe's
    ``state_dict`` up to date, in place) and, once ``model`` holds prepared experts, that they are the
    checkpoint's (gate inputs were cached for them)."""
    check_variant(checkpoint.get("hyper_parameters", {}), model.hparams, source)
    stored = checkpoint.get("moe_data_fingerprint")
    if stored and data and stored != data:
        raise ExpertsMismatchError(
            f"{source}: trained on data {stored}, but {data_source} holds data {data}: "
            "its experts do not belong to this data"
        )
    state = checkpoint.get("state_dict", {})
    upgrade_state(state)
    check_state_fits(model, state, source)
    if bool(model.mixture.prepared):
        for name, own in model.mixture.experts.state_dict(prefix="mixture.experts.").items():
            if torch.is_tensor(own) and not torch.equal(state[name].detach().cpu(), own.detach().cpu()):
                raise ExpertsMismatchError(
                    f"{source}: its experts differ from those prepared for this run (other --model.expert_* "
                    "settings or a refitted bundle); resume with the settings it was trained with"
                )


LEGACY_LABELS = ("log_g",)  # what a checkpoint saved before --model.labels predicts
LEGACY_ROUTING = "shared"


def variant(hparams) -> dict[str, object]:
    """What makes a gate variant, by the flag that sets it: the fusion, the expert family, the labels and, for
    gates that learn, whether it has the variance head and how it routes the labels (``hparams``: a model's, a
    checkpoint's or a parsed config's; one saved before labels were a setting predicts log g alone)."""
    fusion = hparams["fusion"]
    out = {
        "--model.fusion": fusion,
        "--model.experts": hparams.get("experts") or default_family(fusion),
        "--model.labels": tuple(hparams.get("labels") or LEGACY_LABELS),
    }
    if fusion not in ("oracle", "global"):  # the gates that learn nothing have no head or routing either way
        out["--model.variance_head"] = bool(hparams.get("variance_head", True))
        if len(out["--model.labels"]) > 1:  # one label: both routings are the same gate
            out["--model.routing"] = hparams.get("routing") or LEGACY_ROUTING
    return out


def _flag_value(value) -> str:
    """A setting as it is written on the command line: ``[log_g, T_eff]`` for a list."""
    return f"[{', '.join(map(str, value))}]" if isinstance(value, (list, tuple)) else str(value)


def check_variant(saved, hparams, source: str | os.PathLike) -> None:
    """Refuse a checkpoint (hyperparameters ``saved``) of another gate variant than ``hparams``, naming the
    flag and both values (a checkpoint that saved none is let through to the tensor checks)."""
    if "fusion" not in saved:
        return
    theirs = variant(saved)
    for flag, here in variant(hparams).items():
        if flag in theirs and theirs[flag] != here:
            was, now = _flag_value(theirs[flag]), _flag_value(here)
            raise CheckpointError(
                f"{source}: trained with {flag} {was}, but this command has {flag} {now}; "
                f"pass {flag} {was} (or the config it was trained with)"
            )


# what an earlier moe saved under another name: every tensor at the top level before the mixture was a module
# of its own, and the sigma map's buffers as sigma_*
_MOVED = {"sigma_scale": "calibration.scale", "sigma_ref": "calibration.ref", "sigma_power": "calibration.power"}


def upgrade_state(state: dict) -> None:
    """Bring a ``state_dict`` saved by an earlier moe up to date, in place: its tensors renamed to where
    this version keeps them, and what it lacks and has a meaning for filled in."""
    if "prepared" in state:  # saved before GatedMoE held its network in ``mixture``
        for name in list(state):
            state["mixture." + _MOVED.get(name, name)] = state.pop(name)
    scale = state.get("mixture.calibration.scale")
    for name in ("ref", "power"):  # saved before the power map: the plain factor
        if scale is not None and f"mixture.calibration.{name}" not in state:
            state[f"mixture.calibration.{name}"] = torch.ones_like(scale)
    stack_label_gates(state, "mixture.gate.")  # per-label gates saved as L networks before the grouped layers
    if "mixture.experts.weight" in state and state["mixture.experts.weight"].ndim == 2:  # before the label axis
        for name in ("experts", "global_expert"):  # [K, D] -> [K, 1, D], [K] -> [K, 1]: log g alone
            for part in ("weight", "bias"):
                key = f"mixture.{name}.{part}"
                state[key] = state[key].unsqueeze(1)
        state["mixture.model_var"] = state["mixture.model_var"].unsqueeze(1)  # [K, 4] -> [K, 1, 4]
        for name in ("scale", "ref", "power"):  # [S] -> [1, S]
            key = f"mixture.calibration.{name}"
            if key in state:
                state[key] = state[key].unsqueeze(0)
        # the variance head then read log noise variance, log disagreement and log g - 3 unstandardised
        state.setdefault("mixture.label_mean", torch.tensor([3.0]))
        state.setdefault("mixture.label_std", torch.tensor([1.0]))
    scale = state.get("mixture.calibration.scale")
    if scale is not None and "mixture.calibration.rho" not in state:  # saved before the error correlations: 0
        n_labels, n_bins = scale.shape
        state["mixture.calibration.rho"] = scale.new_zeros(n_labels * (n_labels - 1) // 2, n_bins, 1 + n_labels)
    if scale is not None and "mixture.calibration.cell_scale" not in state:  # before the cells: one, factor 1
        n_labels, n_bins = scale.shape
        state["mixture.calibration.cell_edges"] = scale.new_full((n_labels, n_bins, N_CELLS - 1), float("inf"))
        state["mixture.calibration.cell_scale"] = scale.new_ones(n_labels, n_bins, N_CELLS)


def stack_label_gate_moments(checkpoint: dict, names: list[str], prefix: str = "mixture.gate.") -> None:
    """A checkpoint's optimiser state saved with per-label gates as L networks (``<prefix>gates.<l>.*``, before
    the grouped layers) made the grouped gate's, in place, so such a run resumes: ``names`` are this model's
    trainable parameters in the optimiser's order (the gate's contiguous); each grouped parameter's state (Adam's
    moments) is the L networks' stacked as its weights are (:func:`~moe.gates.fusions.stack_label_gates`), a step
    count the first network's. Call before :func:`upgrade_state` (which renames the weights); a checkpoint of
    another layout, or an optimiser state that does not match it, is left as it is."""
    head = prefix + "gates."
    saved = [k[len(head) :].split(".", 1)[0] for k in checkpoint.get("state_dict", {}) if k.startswith(head)]
    if not saved or not all(i.isdigit() for i in saved):
        return
    n = 1 + max(map(int, saved))
    gate = [i for i, name in enumerate(names) if name.startswith(prefix)]
    if not gate or gate != list(range(gate[0], gate[0] + len(gate))):
        return
    first, width = gate[0], len(gate)

    def old_position(j: int, label: int = 0) -> int:  # where parameter j of this model sat in the L-network layout
        if j < first:
            return j
        if j < first + width:
            return first + label * width + (j - first)
        return j + (n - 1) * width

    for opt in checkpoint.get("optimizer_states", []):
        groups = opt.get("param_groups", [])
        if len(groups) != 1 or len(groups[0]["params"]) != len(names) + (n - 1) * width:
            continue
        ids, state = groups[0]["params"], opt.get("state", {})
        new_state = {}
        for j in range(len(names)):
            labels = range(n) if first <= j < first + width else range(1)
            parts = [state.get(ids[old_position(j, label)]) for label in labels]
            if any(p is None for p in parts):  # a parameter that never had a step
                continue
            new_state[j] = {
                key: torch.stack([p[key] for p in parts]) if len(parts) > 1 and key != "step" else value
                for key, value in parts[0].items()
            }
        opt["state"] = new_state
        groups[0]["params"] = list(range(len(names)))


def check_state_fits(model: torch.nn.Module, state: dict, source: str | os.PathLike) -> None:
    """Refuse a checkpoint's ``state_dict`` whose tensors do not fit ``model`` -- one saved by an earlier moe
    whose layers differed, or edited -- with one line naming the first tensor that differs and what to do
    (torch's own error is a multi-line list of every size). Run after the variant checks (fusion, experts,
    variance head), so what is left is a difference of versions."""
    own = model.state_dict()
    for name, value in own.items():
        if not torch.is_tensor(value):  # a module's extra state (checked by the module itself)
            continue
        theirs = state.get(name)
        if theirs is None:
            problem = f"has no {name}, which this model has with shape {tuple(value.shape)}"
        elif not torch.is_tensor(theirs) or tuple(theirs.shape) != tuple(value.shape):
            problem = (
                f"its {name} has shape {tuple(getattr(theirs, 'shape', ()))}, this model's is {tuple(value.shape)}"
            )
        else:
            continue
        raise CheckpointError(f"{source}: {problem}; {_RETRAIN}")
    extra = sorted(set(state) - set(own))
    if extra:
        more = f" and {len(extra) - 1} other tensor(s)" if len(extra) > 1 else ""
        raise CheckpointError(f"{source}: holds {extra[0]}{more}, which this model does not have; {_RETRAIN}")


_RETRAIN = "the checkpoint was saved by another version of moe or edited: retrain it with this version (moe fit)"


def run_name(fusion: str, experts: str) -> str:
    """The run folder name of a gate variant, e.g. ``concat-phys``."""
    return f"{fusion}-{experts}"


def versions(root: str | os.PathLike, name: str) -> list[Path]:
    """``version_N`` folders of run ``name`` under ``root``, oldest first."""
    base = Path(root) / RUNS_DIR / name
    found = [p for p in base.glob("version_*") if p.is_dir() and re.fullmatch(r"version_\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def version_of(ckpt: str | os.PathLike, root: str | os.PathLike, name: str) -> int | None:
    """N when ``ckpt`` lies in ``<root>/lightning_logs/<name>/version_N/checkpoints/``, else None."""
    path = Path(ckpt).resolve()
    base = (Path(root) / RUNS_DIR / name).resolve()
    if path.parent.name == "checkpoints" and path.parent.parent.parent == base:
        match = re.fullmatch(r"version_(\d+)", path.parent.parent.name)
        return int(match.group(1)) if match else None
    return None


def find_checkpoint(root: str | os.PathLike, name: str, which: str) -> Path:
    """The ``best`` or ``last`` checkpoint of the newest version of run ``name`` that saved a ``last.ckpt``.

    ``best`` is the one its ModelCheckpoint recorded (looked up in the same ``checkpoints/`` folder,
    so a moved run folder still resolves); a run that recorded none (``fast_dev_run``, no validation)
    gives its ``last.ckpt``.
    """
    runs = [v for v in versions(root, name) if (v / "checkpoints" / LAST).is_file()]
    if not runs:
        raise CheckpointError(
            f"--ckpt_path {which}: no checkpoint of run {name!r} under {Path(root) / RUNS_DIR / name} "
            "(train it first with `moe fit` and the same --model.fusion / --model.experts)"
        )
    last = runs[-1] / "checkpoints" / LAST
    if which == "last":
        return last
    for key, cb in read_checkpoint(last).get("callbacks", {}).items():
        recorded = cb.get("best_model_path") if key.startswith("ModelCheckpoint") else None
        if recorded and (last.parent / Path(recorded).name).is_file():
            return last.parent / Path(recorded).name
    return last
