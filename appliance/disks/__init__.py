"""External USB HDDs: adoption, capacity, mirrored copies, retention, verification."""
