"""What runs on, or for, the robot.

- `tflite.runner.PolicyRunner`: runs an exported `.tflite` policy with only
  `ai-edge-litert` and numpy (import `tflite.runner` on the robot; this
  package's `__init__` imports nothing so that stays true);
- `python -m tflite.export model.keras out.tflite ...`: the export command
  line over `keras_sara.export.export_tflite`.
"""
