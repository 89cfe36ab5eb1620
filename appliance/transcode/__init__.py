"""Transfer-syntax policy and transcoding: store format, send format, the verified conversion."""
