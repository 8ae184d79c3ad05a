#!/usr/bin/env bash
# Prune a Darknet YOLO detector with global ADMM: dense eval -> ADMM -> hard prune -> masked
# retraining -> eval -> export (Darknet .weights, ONNX, compact archive).
#
#   scripts/prune_yolo.sh                         the offline demo (make demo): a generated shapes
#                                                 dataset and the shipped demo-tiny detector, 80%
#                                                 global sparsity, run folder runs/demo in the
#                                                 repository
#   scripts/prune_yolo.sh CFG WEIGHTS COCO [FLAGS...]
#                                                 a real model on COCO 2017, e.g.
#                                                 scripts/prune_yolo.sh yolov4.cfg yolov4.weights /data/coco
#                                                 COCO holds images/{train2017,val2017} and
#                                                 annotations/instances_{train2017,val2017}.json;
#                                                 FLAGS go to `yolo-admm detect prune` and override
#                                                 configs/coco.yaml (e.g. --sparsity 0.7 --device cuda);
#                                                 paths are from the current folder, and so is the
#                                                 run folder, runs/<cfg name>-coco unless --out says
#   scripts/prune_yolo.sh --help                  this text
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
    sed -n '2,/^set -/{/^#/s/^# \{0,1\}//p}' "$0"
    exit 0
fi
if [ $# -ne 0 ] && [ $# -lt 3 ]; then
    echo "usage: $0 [CFG WEIGHTS COCO_DIR [FLAGS...]]   (no arguments: the offline demo; --help: more)" >&2
    exit 2
fi
if ! "$PY" -c "import torch, albumentations, pycocotools" 2>/dev/null; then
    echo "$0: $PY lacks the project's packages (torch, albumentations, pycocotools); run 'make venv' in $ROOT" \
        "first, or set PYTHON to a python that has them" >&2
    exit 2
fi

if [ $# -eq 0 ]; then
    cd "$ROOT"
    DATA=runs/demo-data
    WEIGHTS=detector/cfgs/demo-tiny.weights
    [ -f "$DATA/data.yaml" ] || "$PY" -c \
        "from data.synthetic import make_shapes_dataset; make_shapes_dataset('$DATA', 480, 160, seed=0)"
    if [ ! -f "$WEIGHTS" ]; then
        WEIGHTS=runs/demo-pretrain/demo-tiny.weights
        [ -f "$WEIGHTS" ] || "$PY" -m yolo_admm detect train --cfg detector/cfgs/demo-tiny.cfg \
            --data "$DATA/data.yaml" --epochs 30 --out runs/demo-pretrain
    fi
    exec "$PY" -m yolo_admm detect prune --config configs/demo.yaml --weights "$WEIGHTS" --data "$DATA/data.yaml"
fi

CFG=$1 WEIGHTS=$2 COCO=$3
shift 3
exec "$PY" -m yolo_admm detect prune --config "$ROOT/configs/coco.yaml" --cfg "$CFG" --weights "$WEIGHTS" \
    --train-images "$COCO/images/train2017" --train-annotations "$COCO/annotations/instances_train2017.json" \
    --val-images "$COCO/images/val2017" --val-annotations "$COCO/annotations/instances_val2017.json" \
    --out "runs/$(basename "${CFG%.cfg}")-coco" "$@"
