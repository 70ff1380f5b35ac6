"""usdet data: cropping, converters (BUSI, hospital frames, DICOM), phantoms, registration.

Importing this package registers every converted dataset under ``$USDET_DATASETS`` (default
``datasets/``) in detectron2's catalogs, as detectron2's builtin datasets do.
"""
from .register import register_all_usdet_datasets  # noqa: F401

register_all_usdet_datasets()
