"""``autoseg benchmark``: how fast autoseg runs on this machine, measured the same way every time.

Four stages are measured on one dataset (your own, or a generated example):

* **plan**: fingerprint + plan wall time (the fingerprint is recomputed every run);
* **preprocess**: cases per second for each planned configuration, all cases redone every run;
* **train**: iterations per second for each planned configuration, split into the time the loop
  waited for a batch (``data``) and the time of the network step (``network``: forward, loss,
  backward, optimizer step); on CUDA also the peak GPU memory next to the planner's estimate;
* **predict**: sliding-window inference seconds per case and input voxels per second, with and
  without mirroring test-time augmentation.

How each figure is taken, so numbers from different machines and versions compare:

* Every stage runs in a fresh Python process (``python -m autoseg.bench.stages STAGE ...``) so that
  its memory is its own. The parent samples the memory of the stage's whole process tree (the stage
  and every process it starts: preprocessing workers, data-loading workers) from ``/proc`` every
  :data:`SAMPLE_INTERVAL` seconds, summing resident set sizes (RSS), and less often proportional
  set sizes (PSS: shared pages split between the processes that share them, the fairer figure when
  forked workers share libraries); see :class:`~autoseg.bench.measure.TreeMemorySampler`. It also keeps the peak RSS of
  the largest single process (from the same samples: ``wait4``'s ``ru_maxrss`` would count a large
  parent's memory in a forked child) and the CPU time of the tree (``wait4``).
* Inside the stage process each measurement runs once as a warm-up (imports, file caches, lazy
  CUDA and cuDNN initialisation, worker start) and then ``repeats`` times. Each figure is reported
  as ``{"median", "min", "max", "runs"}`` where ``runs`` lists every measured value.
* Training epochs are the repeats: epoch 0 is the warm-up, each later epoch of
  ``iterations_per_epoch`` iterations is one run; the times come from the trainer's own
  ``training_log.jsonl`` (``data_time`` and ``compute_time``).

The same process-tree measurement (:func:`~autoseg.bench.measure.run_measured`) is used by
``tests/benchmarks/compare_nnunet.py`` for nnU-Net's commands, so both frameworks are measured alike.

Modules: :mod:`~autoseg.bench.measure` (statistics, machine, process-tree memory),
:mod:`~autoseg.bench.stages` (what runs in each stage's own process) and :mod:`~autoseg.bench.run`
(the whole benchmark and its report). The package itself imports nothing, so a stage process
holds only what its stage needs.
"""
