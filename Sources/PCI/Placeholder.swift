// Placeholder: replaced by the PCI module's real files.
