"""DICOM gateway appliance: receive, archive, forward and keep images safe."""

__version__ = "0.1.0"
