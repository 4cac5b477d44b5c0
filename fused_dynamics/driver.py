"""Control flow of a fused run: the loop over steps, chunks with host visits, refill, sinks,
statistics and checkpoints: :func:`run`, the entry point of ``FusedStage.run``, over the traced
loop (:mod:`fused_dynamics.loop`) and the live run (:mod:`fused_dynamics.live`).

:class:`~fused_dynamics.FusedStage` holds the structure and the pure step; this module drives it.

- A fixed batch without sinks or host hooks runs in one compiled ``lax.while_loop``
  (:func:`run`), also under ``jax.vmap`` and, with ``differentiable=True``, ``jax.grad`` (where
  host hooks are host callbacks).
- Everything else (a sampler, sinks, checkpoints, host hooks on a concrete batch) is a
  :class:`Run`: compiled chunks of at most ``refill_frequency`` steps with a host visit between
  them that delivers the host hooks' records (:mod:`fused_dynamics.recording`), writes
  graduated systems to the sinks, refills their slots from the sampler and writes checkpoints.
  ``fused.run(...)`` drives a :class:`Run` to the end; ``fused.start(...)`` hands it to the
  caller, who may drive it chunk by chunk with the live API of the original (``refill_check``,
  ``room_in_active_batch``, ...; docs/semantics.md §20).
"""

from __future__ import annotations

import os

import jax

from . import loop, recording, sharding, validation
from .batch import Batch
from .compiled import retry_on_overflow
from .live import Run, fit_to_batch
from .loop import compiled_chunk, output_stress, run_steps

__all__ = ["Run", "run", "start", "run_steps", "output_stress", "compiled_chunk"]


def run(
    fused,
    batch: Batch | None = None,
    n_steps: int | None = None,
    *,
    sampler=None,
    refill_frequency: int = 50,
    sinks=(),
    resume: bool | str | os.PathLike = False,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    differentiable: bool = False,
    checkpoints: int | None = None,
    dtype=None,
    listeners=(),
    mesh=None,
    inputs=None,
):
    """Run ``fused`` until every occupied slot has graduated, or for at most ``n_steps`` steps.

    Parameters
    ----------
    fused : FusedStage
    batch : Batch, optional
        A batch from :meth:`Batch.from_atoms`. It is initialized first
        (:meth:`FusedStage.init`) unless ``resume=True``. Omit it in inflight mode.
    n_steps : int, optional
        Maximum number of steps (counted from the batch's ``step_count`` on resume). Required
        when the final sub-stage never graduates (docs/semantics.md §13).
    sampler : SizeAwareSampler, optional
        Inflight mode (docs/semantics.md §14): the batch comes from the sampler, graduated
        systems are written to ``sinks`` and their slots refilled every ``refill_frequency``
        steps, until the sampler is exhausted and nothing is in flight.
    refill_frequency : int, default 50
        Steps per compiled chunk between host visits (inflight, sinks, checkpoints, and the
        delivery of host hooks' records, :mod:`fused_dynamics.recording`). Without host
        hooks, a chunk in which no system graduated goes on, in further ``refill_frequency``
        steps, to at most ``fd.live.STRETCH`` times as many: such a visit would have had
        nothing to write or refill (docs/semantics.md §14).
    sinks : sequence of sinks
        Where graduated systems are written, each to the first with room (§15). With a batch,
        systems are streamed out as they graduate.
    inputs : sequence of ase.Atoms, optional
        With a batch and sinks: the structures the batch was made from
        (``Batch.from_atoms(inputs)``, in that order). Each written system then carries its
        input's ``info``, per-atom ``arrays`` and ``source_index``, as a sampler's do
        (:func:`fused_dynamics.provenance.batch_inputs`); without it a batch's records carry
        the engine's fields only. For the returned batch: ``final.to_atoms(inputs)``.
    resume : bool or path, default False
        ``True``: continue a batch returned by an earlier run of this fused stage where it
        stopped (its step count carries on). A path: continue the run saved in that checkpoint
        (no batch or sampler state needed; give the same sampler and sinks).
    checkpoint : path, optional
        Where to write checkpoints (atomically; see :mod:`fused_dynamics.checkpoint`). No
        file may be there already, unless it is ``resume`` (a resumed run goes on writing
        where it was saved), or, with ``resume=True``, the checkpoint of the run that returned
        ``batch`` (at its step or before): a run never replaces a file it did not write.
    checkpoint_every : int, optional
        Steps between checkpoints (required with ``checkpoint``).
    differentiable : bool, default False
        Use a checkpointed loop of at most ``n_steps`` steps that supports reverse-mode
        ``jax.grad`` (``n_steps`` required; fixed batch only). Gradients may be taken with
        respect to the model's parameters, the stages' parameters and the batch's arrays.
    checkpoints : int, optional
        ``differentiable=True``: number of step states the reverse pass stores (default
        Equinox's, about ``sqrt(2 n_steps)``); the others are recomputed, so memory stays
        ``O(checkpoints)`` batches for any ``n_steps`` (online treeverse checkpointing;
        ``loop.run_steps``).
    dtype : float dtype, optional
        Inflight mode: dtype of the batch built from the sampler.
    listeners : sequence of StageExitWriter
        Inflight mode: writers of systems leaving a sub-stage (see
        :class:`~fused_dynamics.inflight.StageExitWriter`).
    mesh : jax.sharding.Mesh, optional
        Spread the systems over the devices of a mesh with the one axis ``"systems"``
        (data parallel, docs/semantics.md §21; :mod:`fused_dynamics.sharding`). A fixed-batch
        run then returns the sharded batch (``fd.unshard`` gives the flat one).

    Returns
    -------
    Batch or RunStats
        A fixed-batch run returns the final batch, with ``info["exit_reason"]``
        (:class:`~fused_dynamics.ExitReason`), ``info["stage_steps"]`` and ``step_count``. An
        inflight run (a sampler, or a resumed inflight checkpoint) returns its
        :class:`~fused_dynamics.RunStats`.

    Raises
    ------
    ValueError
        Contradictory options (named in the message), before anything is compiled.
    FileExistsError
        Something is at ``checkpoint`` and it is not ``resume``, before anything is compiled.
    """
    if differentiable and n_steps is None:
        raise ValueError("FusedStage.run(differentiable=True) needs n_steps.")
    if checkpoints is not None and (not differentiable or int(checkpoints) < 1):
        raise ValueError(
            f"FusedStage.run: checkpoints={checkpoints!r} needs differentiable=True and a "
            "value >= 1 (the number of states the reverse pass stores)."
        )
    resume_path = None if isinstance(resume, bool) else resume
    live = sampler is not None or sinks or checkpoint is not None or resume_path is not None
    # host hooks of a concrete fixed batch are recorded on the device and delivered once per
    # chunk (fused_dynamics.recording); under jit/vmap/grad they stay host callbacks
    live = live or (
        not differentiable
        and batch is not None
        and not isinstance(batch.cell, jax.core.Tracer)
        and recording.records_hooks(fused)
    )
    if mesh is not None:
        sharding.devices_of(mesh)  # a bad mesh is refused before anything else
    validation.check_integer(
        "FusedStage.run", "n_steps", n_steps, 0, validation.MAX_STEPS, allow_none=True
    )
    if inputs is not None and (not sinks or mesh is not None):
        raise ValueError(
            "FusedStage.run: inputs are copied onto what the sinks write, in a run of a batch "
            "with sinks on one device; for the batch a run returns, use "
            "final.to_atoms(inputs)."
        )
    if live:
        if differentiable:
            raise ValueError(
                "FusedStage.run(differentiable=True) runs a fixed batch in one loop; it takes "
                "no sampler, sinks or checkpoints."
            )
        with start(
            fused,
            batch,
            n_steps=n_steps,
            sampler=sampler,
            sinks=sinks,
            refill_frequency=refill_frequency,
            resume=resume,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
            dtype=dtype,
            listeners=listeners,
            mesh=mesh,
            **({} if inputs is None else {"inputs": inputs}),
        ) as live_run:
            live_run.run_to_end()
        return live_run.stats if live_run.inflight_mode else live_run.batch
    if batch is None:
        raise ValueError("FusedStage.run: give a batch (or a sampler for inflight mode).")
    if n_steps is None:  # a live run checks this in Run
        fused.check_ends()
    if resume and not fused.is_initialized(batch):
        raise ValueError(
            "FusedStage.run(resume=True): the batch was not prepared by this fused stage "
            "(stage state or bookkeeping missing); run it without resume first."
        )
    if mesh is not None:
        return sharding.run(
            fused, batch, n_steps, mesh=mesh, resume=bool(resume),
            differentiable=differentiable, checkpoints=checkpoints,
        )  # fmt: skip
    if not isinstance(batch.cell, jax.core.Tracer):
        fused, batch = fit_to_batch(fused, batch)
    options = loop.LoopOptions(
        bool(resume),
        int(n_steps) if differentiable else None,
        None if checkpoints is None else int(checkpoints),
    )
    if fused.compile_step:
        program = loop.compiled_loop(fused)
    else:
        program = loop.run_loop
    limit = loop.step_limit(n_steps)
    return retry_on_overflow(lambda b: program(fused, b, limit, options), batch)


def start(fused, batch: Batch | None = None, *, mesh=None, **options) -> Run:
    """A live run (:class:`Run`; a :class:`~fused_dynamics.sharding.ShardedRun` over the
    devices of ``mesh`` when one is given) with the options of :func:`run`."""
    if mesh is not None:
        return sharding.ShardedRun(fused, batch, mesh=mesh, **options)
    return Run(fused, batch, **options)
