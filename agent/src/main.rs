fn main() {
    let ebpf = aya::EbpfLoader::new().load(kproxy::EBPF_OBJECT).expect("load");
    for (name, _) in ebpf.maps() {
        println!("{name}");
    }
}
