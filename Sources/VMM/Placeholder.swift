// VMM module
