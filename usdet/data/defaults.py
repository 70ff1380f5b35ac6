"""Choices and defaults the converters and their command line share, in a module that imports nothing.

``tools/convert_to_coco.py`` builds its ``--help`` from these without importing the converters
(numpy, OpenCV), and the converters use the same values, so the two cannot drift apart.
"""

#: ``--classes`` value -> category names written.
CLASS_CHOICES = {"lesion": ["lesion"], "benign,malignant": ["benign", "malignant"]}

#: Near-duplicate thresholds: 64x64 grayscale correlation, or 256-bit dHash Hamming distance.
NEAR_DUP_CORR = 0.95
NEAR_DUP_HAMMING = 10
