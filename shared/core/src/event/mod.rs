//! placeholder until the normalizers land
