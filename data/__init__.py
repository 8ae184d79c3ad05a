"""Datasets and transforms (no models). One import line per module; append, keep sorted by module."""
from data.augment import AugmentConfig, build_plain_transform, build_train_transform
from data.eval_dataset import (ImageMeta, InferenceDataset, collate_inference, read_annotated_image, read_rgb,
                               to_network_input)
from data.geometry import FitTransform, boxes_to_network, boxes_to_original, fit_transform
from data.sources import DetectionRecord, DetectionSource, label_path, load_coco_json, load_yolo_dataset
from data.seeded_batches import SeededBatchSampler, draw_seed
from data.synthetic import SHAPE_CLASSES, make_shapes_dataset, render_image
from data.train_dataset import (DetectionTrainDataset, MultiScaleCollate, clean_records, collate_detection,
                                multi_scale_sizes)
