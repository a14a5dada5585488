"""The shared pruning engine: everything a method builds on, and nothing of any one method.

One flow, one module per step (the harness in `suite/` strings them together, `suite/pipeline.py`):

  architectures.py    family adapters and groups (`GroupSet`: one layer's heads or channels as units)
  layerwise.py        the layer pass: the model one decoder layer at a time, hidden states carried
  activations.py      calibration statistics of every prunable Linear's inputs, on the layer pass
  loss.py             the calibration loss, whole-model or layer by layer over several streams
  gates.py            multiplicative gates on groups' feature maps (masked evaluation without slicing)
  scoring.py          the method contract (`Scoring`) and `checked_options`
  options.py          the option schema methods declare (`MethodOptions`), one-line errors
  select.py           a parameter budget -> an allocation over the layer range -> a plan (or a
                      number of whole layers: `depth_budget`, `select_layers`)
  sequential.py       the sequential loop: score, select and slice one layer at a time
  plan.py             plans (kept indices, removed layers) and exact physical slicing
  compensation.py     FLAP's bias compensation (Eq. 6) for the removed groups
  saving.py           pruned checkpoints: safetensors, config, tokenizer, plan.json (depth alone:
                      an ordinary transformers checkpoint)
  modeling_pruned.py  the modeling file copied beside a pruned checkpoint (torch + transformers only)
  errors.py           `UserError`: bad input, one line, exit 2

It imports nothing from the harness above it (`suite.*` outside this package) and no method
(`minillm`, `baselines`): a method imports the engine, never the reverse.
"""
