"""Graph passes: one small module per rewrite of an ONNX (or OpenVINO) graph; targets call them."""
