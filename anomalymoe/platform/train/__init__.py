"""Training: ``trainer`` (one process: steps, schedule, calibration entry), ``optim``, ``distributed`` (all-reduce
helpers), ``checkpoint`` (save/resume), ``validation`` (model selection and calibration on held-out normals),
``config`` (presets + YAML + flags layered into a job spec), ``job`` (the Ray Train worker loop and the driver:
prepare data, run, calibrate, evaluate, register), ``tuning`` (Ray Tune searches)."""
