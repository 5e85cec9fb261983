// ManagerTests are being written; this file goes when real tests land.
