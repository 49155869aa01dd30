//! Lab of network namespaces (filled in next).
