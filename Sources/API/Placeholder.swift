// Placeholder: replaced by the API module's real files.
