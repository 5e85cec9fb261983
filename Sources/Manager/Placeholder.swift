// The Manager target (libvirt's role) is being written; this file goes when real sources land.
