"""The demo pipeline (``mgll demo``) and its HTML report."""
