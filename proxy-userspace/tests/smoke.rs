use proxy_userspace::datapath::Datapath;
#[test]
fn loads() {
    let dp = Datapath::load_private();
    if let Err(e) = &dp { eprintln!("{e:?}"); }
    dp.unwrap();
}
