// Placeholder: replaced by the Virtio module's real files.
