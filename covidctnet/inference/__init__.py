"""Running trained models: residual maps, predict, predict-slice with Grad-CAM, torch/onnx backends, ONNX export."""
