"""Converters from the formats multispectral data sets ship in to this project's paired COCO layouts.

One module per source format (``kaist``, ``flir``, ``m3fd``, ``generic``), each with a ``convert(...) -> Report``;
``common`` holds what they share (output layouts, pairing, splits, label maps, the writing step), ``files`` the
idempotent file output, ``report`` the report, ``labels`` the label-file readers (Pascal VOC XML, YOLO text).
``tools/convert.py`` is the command line.
"""
