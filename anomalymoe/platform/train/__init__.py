"""Training: ``trainer`` (one process: steps, schedule, calibration entry), ``optim``, ``distributed`` (all-reduce
helpers), ``checkpoint`` (save/resume), ``validation`` (model selection and calibration on held-out normals),
``config`` (presets + YAML + flags layered into a job spec), ``job`` (the job spec and the driver: prepare data,
run, calibrate, evaluate, register), ``loop`` (the Ray Train worker loop), ``tuning`` (Ray Tune searches)."""
