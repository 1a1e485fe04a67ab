"""Internal helpers every floor may use: argument checks, atomic file storage, integrity seals, timing."""
