fn main() {
    println!("{}", proxy_userspace::EBPF_OBJECT.len());
}
