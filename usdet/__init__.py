"""usdet: breast-lesion detection in ultrasound with detectron2 Faster R-CNN."""

__version__ = "0.1.0"
