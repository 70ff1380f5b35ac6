"""usdet data: cropping, converters (BUSI, BrEaST, BUS-BRA, image+mask folders, hospital frames, DICOM),
phantoms, registration.

Importing this package is light: it registers nothing and imports neither torch nor detectron2.
Converted datasets under ``$USDET_DATASETS`` are registered as ``<dataset>_<split>`` by
:func:`usdet.data.register.ensure_usdet_datasets`, which the engine calls when it is imported.
"""
