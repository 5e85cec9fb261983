// DiskImage module
