"""usdet visualization: truth-vs-prediction overlays and contact sheets (overlay), Grad-CAM
heatmaps for the detector (gradcam, imported on demand since it pulls in pytorch-grad-cam)."""
from .overlay import (  # noqa: F401
    ImageOutcome,
    contact_sheet,
    draw_overlay,
    match_image,
    outcome_file_name,
    visualize_coco_results,
)
