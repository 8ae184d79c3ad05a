"""Darknet YOLO detectors in PyTorch: cfg parsing, the module graph, head decoding, .weights I/O."""
from detector.cfg import DarknetError, NetConfig, parse_cfg
from detector.head import YoloHead, decode
from detector.model import DarknetModel, fused_for_inference, load_darknet
from detector.weights import WeightsHeader, read_weights, write_weights

__all__ = [
    "DarknetError",
    "DarknetModel",
    "NetConfig",
    "WeightsHeader",
    "YoloHead",
    "decode",
    "fused_for_inference",
    "load_darknet",
    "parse_cfg",
    "read_weights",
    "write_weights",
]
