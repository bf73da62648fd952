"""ONNX / TensorRT export of the extractor and the segmenter."""
