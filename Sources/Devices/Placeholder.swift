// Devices module
