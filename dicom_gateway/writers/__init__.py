"""Output writers (design.md §4 "Outputs"): DICOM SEG, Secondary Capture overlay series, TID 1500 SR."""
